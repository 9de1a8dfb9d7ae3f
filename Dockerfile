# syntax=docker/dockerfile:1
# layerskip-serve: the OpenAI-compatible LayerSkip server with the bundled model inside.
#
#   docker build -t layerskip-serve:cuda .                          # CUDA 12.6 torch (default)
#   docker build --build-arg VARIANT=cpu -t layerskip-serve:cpu .   # CPU-only torch, no CUDA base
#   docker run --gpus all -p 127.0.0.1:8000:8000 layerskip-serve:cuda
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v /srv/ckpt:/models:ro layerskip-serve:cuda \
#       --model /models/layerskip-llama3.2-1B --exit-layer 4 --num-speculations 4
#
# Arguments after the image name are layerskip-serve flags; every flag is also read from
# LAYERSKIP_<FLAG> (LAYERSKIP_MAX_NUM_SEQS=16). /models is the place to mount other checkpoints,
# read-only. The install steps are scripts/install.sh, which CI runs too. deploy/README.md has more.

ARG VARIANT=cuda

# The two bases differ only in what torch build they get and the default device.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
    LAYERSKIP_DEVICE=cuda

FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    LAYERSKIP_DEVICE=cpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
# Ubuntu's python3 (3.12); versions are those of the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG TORCH_SPEC=torch==2.13.0
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY engine/ engine/
COPY models/ models/
COPY scripts/install.sh scripts/
RUN PIP_NO_CACHE_DIR=1 TORCH_SPEC="${TORCH_SPEC}" scripts/install.sh /opt/venv /src

FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="layerskip-serve" \
      org.opencontainers.image.description="OpenAI-compatible server with LayerSkip self-speculative decoding (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 layerskip \
    && useradd --system --uid 10001 --gid layerskip --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin layerskip \
    && mkdir /models
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 scripts/healthcheck.py /usr/local/bin/layerskip-healthcheck
# HOME and HF_HOME under /tmp: the only place written to, so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LAYERSKIP_HOST=0.0.0.0 \
    LAYERSKIP_PORT=8000
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/usr/local/bin/layerskip-healthcheck"]
ENTRYPOINT ["/opt/venv/bin/layerskip-serve"]
