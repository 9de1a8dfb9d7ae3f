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
    ("max-num-batched-tokens", int, 2048, "prompt tokens prefilled per step"),
    ("max-model-len", int, None, "prompt + completion limit in tokens (default: the model's)"),
    ("seed", int, 0, "random seed"),
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
    )


def main(argv: list[str] | None = None) -> None:
    """Load the model, build the app and serve it with uvicorn."""
    import uvicorn

    from engine.client import AsyncEngine
    from engine.loop import EngineCore
    from engine.metrics import EngineMetrics
    from server.app import build_app

    args = parse_args(argv)
    # OpenMP threads that spin while they wait make small CPU ops 5-40x slower as soon as another
    # process wants the same cores; sleeping waiters cost little at decode sizes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        core = EngineCore(engine_config(args))
    except ValueError as exc:  # CheckpointError included: name what is wrong, no traceback
        raise SystemExit(f"layerskip-serve: {exc}") from None
    metrics = EngineMetrics(core.model_name)
    app = build_app(AsyncEngine(core, metrics), metrics)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.timeout_graceful_shutdown)


if __name__ == "__main__":
    main()
