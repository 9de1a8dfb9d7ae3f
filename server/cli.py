"""``layerskip-serve``: the command-line entry, the only place that reads argv and the environment.

Flags use vLLM's names where one exists; each also reads ``LAYERSKIP_<FLAG>`` (e.g.
``LAYERSKIP_PORT=9000``), and a flag given on the command line wins over the environment. An empty
variable counts as unset (templated deployments often render them empty); an invalid one is a
clean error that names the variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.config import EngineConfig

FLAGS = (
    # name, type, default, help
    ("model", str, None, "checkpoint folder or .gguf file (default: the bundled layerskip-stdlib model)"),
    ("served-model-name", str, None, "the model name the API answers to (default: folder name)"),
    ("host", str, "127.0.0.1", "address to bind"),
    ("port", int, 8000, "port to bind"),
    ("exit-layer", int, None, "LayerSkip exit layer E (default: the checkpoint's)"),
    ("num-speculations", int, None, "most draft tokens per round; 0 turns speculation off"),
    ("adaptive-speculation", "bool", True, "lower a sequence's drafts (to 0) while its acceptance "
     "is too low to pay; off drafts num-speculations every round"),
    ("dtype", str, "auto", "auto, float32, float16 or bfloat16"),
    ("device", str, "cpu", "cpu or cuda"),
    ("max-num-seqs", int, 8, "sequences decoded together"),
    ("max-num-batched-tokens", int, 2048, "tokens per step: decoding rounds first, then prompt "
     "chunks fill the rest (chunked prefill)"),
    ("max-model-len", int, None, "prompt + completion limit in tokens (default: the model's)"),
    ("allow-long-max-model-len", "bool", False, "accept a --max-model-len above the model's "
     "context (vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN); refused at start-up otherwise"),
    ("max-waiting-requests", int, 1024, "most sequences (prompts x n) waiting beyond the "
     "max-num-seqs running ones; past it requests get 503 + Retry-After; 0 turns the bound off"),
    ("seed", int, 0, "random seed"),
    ("cpu-threads", int, None, "torch threads of the engine process on the CPU (default: the "
     "usable cores less one, at least 1, leaving a core to the HTTP process)"),
    ("max-request-body-bytes", int, 16 * 2**20, "larger request bodies get 413 unread (bytes)"),
    ("timeout-graceful-shutdown", float, 60.0, "seconds to let running requests finish after "
     "SIGTERM before closing them (match Kubernetes' terminationGracePeriodSeconds)"),
    ("log-level", str, "info", "debug, info, warning or error"),
)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    """Parse flags, taking defaults from ``LAYERSKIP_*`` environment variables.

    Raises:
        SystemExit: a bad flag, or a ``LAYERSKIP_*`` variable that does not parse (named).
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="layerskip-serve", description=__doc__.split("\n")[0])
    for name, kind, default, doc in FLAGS:
        env = "LAYERSKIP_" + name.upper().replace("-", "_")
        value = environ.get(env, "").strip()
        convert = _bool if kind == "bool" else kind
        if value:
            try:
                default = convert(value)
            except ValueError:
                parser.error(f"environment variable {env}={value!r} is not a valid {name}")
        if kind == "bool":
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                                help=f"{doc} [env {env}]")
        else:
            parser.add_argument(f"--{name}", type=kind, default=default, help=f"{doc} [env {env}]")
    return parser.parse_args(argv)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The :class:`EngineConfig` the flags describe."""
    from models.loader import BUNDLED_MODEL

    return EngineConfig(
        model=args.model or str(BUNDLED_MODEL), served_model_name=args.served_model_name,
        device=args.device, dtype=args.dtype, exit_layer=args.exit_layer,
        num_speculations=args.num_speculations, adaptive_speculation=args.adaptive_speculation,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, seed=args.seed,
        max_waiting_requests=args.max_waiting_requests or None,
        allow_long_max_model_len=args.allow_long_max_model_len,
    )


def default_cpu_threads() -> int:
    """The engine's torch threads when ``--cpu-threads`` is not given: the cores this process may
    use less one (at least 1), so the HTTP process keeps a core of its own. On this project's
    2-core machine one engine thread beat two through HTTP (``bench/serve.py --cpu-threads``,
    README)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def main(argv: list[str] | None = None) -> None:
    """Start the engine process, load the model, build the app and serve it.

    Exits 0 after a clean shutdown, 1 when the engine process died, with one line and exit
    status 1 when the model cannot be loaded.
    """
    args = parse_args(argv)
    # OpenMP threads that spin while they wait make small CPU ops 5-40x slower as soon as another
    # process wants the same cores; sleeping waiters cost little at decode sizes. The engine
    # process inherits this.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.client import MPEngineClient
    from engine.metrics import EngineMetrics
    from server.app import build_app
    from server.serving import DrainingServer

    threads = args.cpu_threads or default_cpu_threads()
    if threads < 1:
        raise SystemExit(f"layerskip-serve: --cpu-threads must be at least 1, got {threads}")
    engine = MPEngineClient(engine_config(args), threads, log_level=args.log_level)
    try:
        info = engine.load()
    except (ValueError, RuntimeError) as exc:  # CheckpointError included: no traceback
        raise SystemExit(f"layerskip-serve: {exc}") from None
    logging.getLogger("layerskip-serve").info(
        "serving %s (%s) from %s on %s: engine process %d, %s cpu threads, KV cache %d bytes "
        "(%.1f MiB), max_model_len %d, max_waiting_requests %s", info.model_name, args.dtype,
        info.model_path, args.device, engine.pid, info.cpu_threads, info.num_kv_cache_bytes,
        info.num_kv_cache_bytes / 2**20, info.max_model_len, info.max_waiting_requests)
    engine.metrics = metrics = EngineMetrics(info.model_name)
    app = build_app(engine, metrics, args.max_request_body_bytes)
    server = DrainingServer(app, args.timeout_graceful_shutdown, host=args.host, port=args.port,
                            log_level=args.log_level)
    try:
        server.run()
    finally:
        engine.shutdown()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
