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

DESCRIPTION = """\
An OpenAI-compatible inference server (completions, chat, and vLLM's extras) that decodes with
batched LayerSkip self-speculation: the model's first exit-layer layers draft tokens and the rest
verify them, so greedy output equals plain decoding token for token and sampling stays lossless.
It serves one local checkpoint (a Hugging Face Llama-family folder, or a .gguf file) on
/v1/completions, /v1/chat/completions, /v1/models, /tokenize and /detokenize, with /health and
Prometheus /metrics. Every flag also reads LAYERSKIP_<FLAG> from the environment (an empty
variable counts as unset); a flag on the command line wins."""

EPILOG = """\
examples:
  layerskip-serve                                    # the bundled model on 127.0.0.1:8000
  hf download facebook/layerskip-llama3.2-1B --local-dir ckpt
  layerskip-serve --model ckpt --device cuda --exit-layer 4 --num-speculations 4
  LAYERSKIP_API_KEY=k1,k2 layerskip-serve --host 0.0.0.0   # /v1/* needs "Bearer k1" or "Bearer k2"
"""

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    value = text.strip().lower()
    head, _, index = value.partition(":")
    if value == "cpu" or (head == "cuda" and (not index or index.isdigit())):
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported on one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


FLAGS = (
    # name, type, default, help[, choices]
    ("model", str, None, "local checkpoint folder (Hugging Face layout: config.json, "
     "model.safetensors, tokenizer) or .gguf file (default: the bundled layerskip-stdlib model)"),
    ("served-model-name", str, None, "the model name the API answers to (default: the folder's "
     "name)"),
    ("host", str, "127.0.0.1", "address to bind (0.0.0.0 for every interface: set --api-key)"),
    ("port", int, 8000, "port to bind"),
    ("api-key", "keys", None, "require 'Authorization: Bearer <key>' on /v1/*, the tokenizer "
     "endpoints and /reset_prefix_cache; repeat the flag (or comma-separate LAYERSKIP_API_KEY) "
     "for several keys (default: no authentication)"),
    ("protect-metrics", "bool", False, "with --api-key, /metrics needs a key too (/health "
     "always stays open for probes)"),
    ("server-dev-mode", "bool", False, "also serve the development endpoints (POST "
     "/reset_prefix_cache, for benchmarks; needs the key with --api-key)"),
    ("exit-layer", int, None, "LayerSkip exit layer E: the draft runs layers [0, E) (default: the "
     "checkpoint's assistant_early_exit, else a quarter of its layers)"),
    ("num-speculations", int, None, "most draft tokens per round; 0 turns speculation off "
     "(default: the checkpoint's num_assistant_tokens, else 4)"),
    ("adaptive-speculation", "bool", True, "choose each round's drafts (down to 0) from measured "
     "round times and acceptance; off drafts num-speculations every round"),
    ("draft-vocab-size", int, None, "the draft's LM head scores only the N most frequent tokens "
     "(FR-Spec; default: the checkpoint's draft_vocab.json, else the full head; 0: full head)"),
    ("draft-token-counts", str, None, "token-counts JSON ranking the draft vocabulary (default: "
     "the checkpoint's draft_vocab.json; python -m models.draft_vocab makes one)"),
    ("dtype", str, "auto", "weights and KV cache dtype; auto is float32 on the CPU and bfloat16 "
     "on CUDA", DTYPES),
    ("device", _device, "cpu", "cpu, cuda or cuda:N"),
    ("max-num-seqs", int, 16, "sequences decoded together"),
    ("max-num-batched-tokens", int, 2048, "tokens per step: decoding rounds first, then prompt "
     "chunks fill the rest (chunked prefill)"),
    ("max-model-len", int, None, "prompt + completion limit in tokens (default: the model's)"),
    ("allow-long-max-model-len", "bool", False, "accept a --max-model-len above the model's "
     "context (vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN); refused at start-up otherwise"),
    ("block-size", int, 16, "KV cache positions per block (tokens)"),
    ("kv-cache-memory-bytes", int, None, "the KV cache's memory budget in bytes, which sets its "
     "number of blocks (default: on CUDA --gpu-memory-utilization of the device, on the CPU what "
     "max-num-seqs sequences of max-model-len need, at most 4 GiB)"),
    ("gpu-memory-utilization", float, 0.9, "CUDA, without --kv-cache-memory-bytes: the fraction "
     "of the device's memory for weights and KV cache"),
    ("enable-prefix-caching", "bool", True, "reuse the KV blocks of prompt prefixes already "
     "computed (system prompts, few-shot headers) across requests"),
    ("enforce-eager", "bool", False, "never use CUDA graphs: run every decode step, draft step "
     "and verify call eagerly (vLLM's flag; on the CPU graphs are always off)"),
    ("max-waiting-requests", int, 1024, "most sequences (prompts x n) waiting beyond the "
     "max-num-seqs running ones; past it requests get 503 + Retry-After; 0 turns the bound off"),
    ("seed", int, 0, "random seed"),
    ("cpu-threads", int, None, "torch threads of the engine process on the CPU (default: the "
     "usable cores less one, at least 1, leaving a core to the HTTP process)"),
    ("max-request-body-bytes", int, 16 * 2**20, "larger request bodies get 413 unread (bytes)"),
    ("timeout-graceful-shutdown", float, 60.0, "seconds to let running requests finish after "
     "SIGTERM before closing them (match Kubernetes' terminationGracePeriodSeconds)"),
    ("log-level", str, "info", "logging level of the server and its engine process", LOG_LEVELS),
)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _keys(text: str) -> list[str]:
    """API keys from a flag or ``LAYERSKIP_API_KEY``: comma-separated, blanks dropped."""
    return [k.strip() for k in text.split(",") if k.strip()]


def _help(doc: str, default, env: str) -> str:
    """A flag's help: its text, its default unless the text already gives it, its variable."""
    shown = "" if default is None or "default" in doc else f" (default: {default})"
    return f"{doc}{shown} [env {env}]"


def _add_flag(parser: argparse.ArgumentParser, name: str, kind, default, doc: str, choices,
              environ) -> None:
    """One flag with its ``LAYERSKIP_<FLAG>`` default; a bad variable is a one-line error."""
    env = "LAYERSKIP_" + name.upper().replace("-", "_")
    value = environ.get(env, "").strip()
    convert = {"bool": _bool, "keys": _keys}.get(kind, kind)
    if choices:
        convert = str.lower
    if value:
        try:
            default = convert(value)
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"environment variable {env}={value!r} is not a valid {name}")
        if choices and default not in choices:
            parser.error(f"environment variable {env}={value!r} is not a valid {name} "
                         f"(choose from {', '.join(choices)})")
    if kind == "bool":
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                            help=_help(doc, default, env))
    elif kind == "keys":  # repeatable; the command line's keys replace the environment's
        parser.add_argument(f"--{name}", action="append", type=_keys, default=None,
                            metavar="KEY", help=_help(doc, None, env))
        parser.set_defaults(**{"env_" + name.replace("-", "_"): default or []})
    else:
        metavar = "{cpu,cuda,cuda:N}" if kind is _device else None
        parser.add_argument(f"--{name}", type=convert, default=default, choices=choices,
                            metavar=metavar, help=_help(doc, default, env))


def build_parser(environ) -> argparse.ArgumentParser:
    """The ``layerskip-serve`` parser, its defaults read from ``environ``.

    Raises:
        SystemExit: (status 2, one line) a ``LAYERSKIP_*`` variable that does not parse.
    """
    from server import package_version

    parser = _Parser(
        prog="layerskip-serve", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"layerskip-serve {package_version()}")
    for name, kind, default, doc, *choices in FLAGS:
        _add_flag(parser, name, kind, default, doc, choices[0] if choices else None, environ)
    return parser


def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    """Parse flags, taking defaults from ``LAYERSKIP_*`` environment variables.

    ``api_key`` comes back as a flat list of keys (empty: no authentication).

    Raises:
        SystemExit: (status 2, one line) a bad flag, or a ``LAYERSKIP_*`` variable that does not
            parse (named).
    """
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    given = args.api_key
    args.api_key = [k for keys in given for k in keys] if given is not None else args.env_api_key
    del args.env_api_key
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The :class:`EngineConfig` the flags describe."""
    from models import BUNDLED_MODEL  # not models.loader: that imports torch

    return EngineConfig(
        model=args.model or str(BUNDLED_MODEL), served_model_name=args.served_model_name,
        device=args.device, dtype=args.dtype, exit_layer=args.exit_layer,
        num_speculations=args.num_speculations, adaptive_speculation=args.adaptive_speculation,
        draft_vocab_size=args.draft_vocab_size, draft_token_counts=args.draft_token_counts,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, seed=args.seed,
        max_waiting_requests=args.max_waiting_requests or None,
        allow_long_max_model_len=args.allow_long_max_model_len,
        block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
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
    status 1 when the model cannot be loaded, and with one line and exit status 2 for a bad
    flag or ``LAYERSKIP_*`` value.
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

    threads = default_cpu_threads() if args.cpu_threads is None else args.cpu_threads
    if threads < 1:
        print(f"layerskip-serve: error: --cpu-threads must be at least 1, got {threads}",
              file=sys.stderr)
        sys.exit(2)
    engine = MPEngineClient(engine_config(args), threads, log_level=args.log_level)
    try:
        info = engine.load()
    except (ValueError, RuntimeError) as exc:  # CheckpointError included: no traceback
        raise SystemExit(f"layerskip-serve: {' '.join(str(exc).split())}") from None
    log = logging.getLogger("layerskip-serve")
    log.info("serving %s from %s: device %s, dtype %s, %s cpu threads, KV cache %d bytes "
             "(%.1f MiB), max_model_len %d, max_waiting_requests %s, engine process %d",
             info.model_name, info.model_path, info.device or args.device,
             info.dtype or args.dtype, info.cpu_threads if info.cpu_threads is not None else "no",
             info.num_kv_cache_bytes, info.num_kv_cache_bytes / 2**20, info.max_model_len,
             info.max_waiting_requests, engine.pid)
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach the port can use "
                    "the API", args.host)
    engine.metrics = metrics = EngineMetrics(info.model_name, max_model_len=info.max_model_len)
    app = build_app(engine, metrics, args.max_request_body_bytes, tuple(args.api_key),
                    args.protect_metrics, args.server_dev_mode)
    server = DrainingServer(app, args.timeout_graceful_shutdown, host=args.host, port=args.port,
                            log_level=args.log_level)
    try:
        server.run()
    finally:
        engine.shutdown()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
