"""Load a local Hugging Face Llama-family checkpoint folder into :class:`models.llama.LlamaModel`.

The config, tokenizer and generation config are read with transformers, the weights with
safetensors (one ``model.safetensors`` or a sharded ``model.safetensors.index.json``). Nothing is
downloaded: the folder must hold every file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models.llama import LlamaModel, LlamaShape

SUPPORTED_MODEL_TYPES = ("llama",)
BUNDLED_MODEL = Path(__file__).resolve().parent / "layerskip-stdlib"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder cannot be served: a file is missing or the architecture is unsupported."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the weights on the requested device and dtype.
        tokenizer: a transformers tokenizer.
        config: the transformers ``PretrainedConfig``.
        generation_config: ``generation_config.json`` as a dict (empty if absent).
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


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
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


def read_config(path: str | Path):
    """Check a checkpoint folder's files and architecture; return its transformers config.

    Raises:
        CheckpointError: a missing file or an unsupported architecture, named in the message.
    """
    from transformers import AutoConfig

    folder = Path(path)
    _check_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    _shape(config)
    return config


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: str = "auto",
                    rope_len: int | None = None) -> LoadedCheckpoint:
    """Load a local checkpoint folder.

    Args:
        path: a folder in the Hugging Face layout (``config.json``, ``*.safetensors``, tokenizer).
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        dtype: ``"auto"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        rope_len: positions to precompute RoPE for (default: ``max_position_embeddings``).

    Raises:
        CheckpointError: a missing file or an unsupported architecture, named in the message.
        ValueError: an unknown dtype.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    folder = Path(path)
    config = read_config(folder)
    shape = _shape(config)
    torch_dtype = resolve_dtype(dtype, device.split(":")[0])
    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        for name, tensor in load_file(file, device="cpu").items():
            weights[name] = tensor.to(device=device, dtype=torch_dtype)
    _check_weights(folder, weights, shape, config)
    max_pos = config.max_position_embeddings
    cos, sin = rope_tables(config, rope_len or max_pos, torch_dtype, device)
    gen_file = folder / "generation_config.json"
    return LoadedCheckpoint(
        model=LlamaModel(shape, weights, cos, sin),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        config=config,
        generation_config=json.loads(gen_file.read_text()) if gen_file.exists() else {},
        max_position_embeddings=max_pos,
    )
