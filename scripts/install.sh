#!/usr/bin/env bash
# Install layerskip-serve (not editable) with a chosen torch build into a virtual environment,
# then check the result: the console script runs, the bundled model arrived as package data and
# loads. The Dockerfile runs this script (CUDA or CPU torch) and so does CI, on the local CPU
# wheel, so that a broken install step fails CI and not a build on a GPU host.
#
# usage: scripts/install.sh VENV [SOURCE]
#   VENV     the virtual environment to create (an existing one is reused)
#   SOURCE   the project folder (default: the repository this script lives in)
# environment:
#   TORCH_SPEC       the torch requirement (default: torch==2.13.0)
#   TORCH_INDEX_URL  the index to take torch from, e.g. https://download.pytorch.org/whl/cu126
#                    (default: pip's configured index)
#   PYTHON           the interpreter that creates VENV (default: python3)
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
venv=$1
source_dir=$(cd "${2:-$(dirname "$0")/..}" && pwd)
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python=${PYTHON:-python3}

log() { printf 'install.sh: %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv with $python"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# torch first, from its own index: the project's range (torch>=2.5,<2.15) is then satisfied and
# pip never resolves torch again (a fresh resolve on PyPI picks a multi-GB CUDA build).
log "installing $torch_spec${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec"

# Build from a clean copy holding only what the package needs, so a stale build/ folder in a
# developer's tree cannot leak files into the wheel and a file missing from package data shows.
build_dir=$(mktemp -d)
trap 'rm -rf "$build_dir"' EXIT
cp -r "$source_dir/pyproject.toml" "$source_dir/README.md" \
      "$source_dir/server" "$source_dir/engine" "$source_dir/models" "$build_dir/"
find "$build_dir" -name __pycache__ -prune -exec rm -rf {} +
log "installing layerskip-serve from $source_dir"
"${pip[@]}" "$build_dir"

log "checking the install"
cd /  # so that no source tree on the path shadows the installed packages
"$venv/bin/layerskip-serve" --help >/dev/null
"$venv/bin/python" - "$source_dir/models/layerskip-stdlib" <<'PY'
import sys
from pathlib import Path

import torch

import server.app  # noqa: F401  (the whole server imports: FastAPI, the engine, transformers)
from models.loader import BUNDLED_MODEL, load_checkpoint

source = Path(sys.argv[1])
assert "site-packages" in BUNDLED_MODEL.parts, f"models imported from {BUNDLED_MODEL}, not the install"
missing = sorted(p.name for p in source.iterdir() if p.is_file() and not (BUNDLED_MODEL / p.name).is_file())
assert not missing, f"bundled model files missing from the installed package: {missing}"
checkpoint = load_checkpoint(BUNDLED_MODEL, device="cpu", dtype="float32")
print(f"install.sh: ok: torch {torch.__version__} (cuda {torch.version.cuda}), bundled model "
      f"{BUNDLED_MODEL} loads ({checkpoint.model.num_layers} layers)",
      file=sys.stderr)
PY
