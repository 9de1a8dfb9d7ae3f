"""Train the bundled LayerSkip model on the Python standard library (a CLI with a progress bar).

The recipe is LayerSkip's (Elhoushi et al., 2024, "LayerSkip: Enabling Early Exit Inference and
Self-Speculative Decoding", arXiv:2404.16710):

- **Layer dropout** (§4.1): layer ``l`` of ``L`` is skipped with probability
  ``p_l = p_max · D(l)``, ``D(l) = e^{l·ln2/(L−1)} − 1``, so the first layer is never skipped and the
  last one with ``p_max``. We skip a layer for the whole micro-batch (the paper draws per sample),
  which saves the layer's compute on a 2-core CPU.
- **Early-exit loss** (§4.2): the model's own final norm and LM head read out intermediate layers;
  the loss is ``Σ_l ẽ(t, l) · CE_l`` with depth-scaled weights ``e(l) = e_scale · Σ_{i≤l} i`` (and
  ``L − 1 + e_scale · Σ_{i≤L−2} i`` for the last layer), normalised over the exits that the
  **curriculum** ``C(t, l)`` enables at step ``t``: *rotational* (every ``R``-th exit, rotating) or
  *gradual* (exits enabled from the last layer down to the first over training).
- **Self-distillation** (our addition, aimed at the draft's acceptance rate): each enabled exit
  also pays ``distill_weight · KL(p_L ‖ p_l)`` toward the last layer's (detached) prediction, since
  self-speculation accepts a draft token exactly when the exit agrees with the last layer.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the training split
only (:mod:`models.corpus`); the model is a ``transformers.LlamaForCausalLM`` with tied embeddings.
At the end the held-out (``valid``) loss and greedy top-1 agreement of every exit layer with the
last layer are measured, the default ``exit_layer`` / ``num_speculations`` are picked from them,
and everything is saved in the Hugging Face folder layout with a model card.

Usage: ``python -m models.train --out models/layerskip-stdlib --steps 3000``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import corpus

EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int, max_files: int | None = None):
    """Train a byte-level BPE tokenizer on the training split; return a ``PreTrainedTokenizerFast``.

    ``max_files`` limits the corpus to its first files (for smoke tests).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = (corpus.read_text(p) for p in corpus.stdlib_files("train")[:max_files])
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)


def encode_split(tokenizer, split: str, max_files: int | None = None) -> torch.Tensor:
    """Encode every file of a split (or its first ``max_files``), each followed by EOS, into one
    1-D ``int64`` tensor (tokens)."""
    texts = [corpus.read_text(p) for p in corpus.stdlib_files(split)[:max_files]]
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def layer_dropout_rates(num_layers: int, p_max: float) -> list[float]:
    """LayerSkip §4.1: ``p_l = p_max · (e^{l·ln2/(L−1)} − 1)`` for layers ``l = 0..L−1``."""
    if num_layers == 1:
        return [0.0]
    return [p_max * (math.exp(l * math.log(2) / (num_layers - 1)) - 1) for l in range(num_layers)]


def exit_weights(num_layers: int, e_scale: float, weighting: str = "paper") -> list[float]:
    """Per-exit loss scales for exits after ``l + 1`` layers, ``l = 0..L−1``.

    ``paper``: LayerSkip §4.2's depth scale ``e(l)``, which grows quadratically with depth. With
    it the shallow exits that serve as drafts carry a few percent of the loss; ``uniform`` gives
    each early exit ``e_scale`` and the last layer ``e_scale · (L − 1)``, so that after the
    normalisation over the enabled exits the last layer keeps a large share while the draft
    exits are trained in earnest.
    """
    if weighting == "uniform":
        return [e_scale] * (num_layers - 1) + [e_scale * (num_layers - 1)]
    w = [e_scale * sum(range(l + 1)) for l in range(num_layers - 1)]
    w.append(num_layers - 1 + e_scale * sum(range(num_layers - 1)))
    return w


def enabled_exits(step: int, total_steps: int, exits: list[int], num_layers: int,
                  curriculum: str, rotation: int) -> list[int]:
    """The curriculum ``C(t, l)`` (§4.2): which exits (layer counts) carry a loss at ``step``.

    The last layer (``num_layers``) is always enabled. *rotational*: exits ``e`` with
    ``e ≡ step (mod rotation)``; *gradual*: the deepest exits first, one more every
    ``total_steps / len(exits)`` steps, down to the shallowest.
    """
    if curriculum == "rotational":
        chosen = [e for e in exits if e % rotation == step % rotation]
    else:
        n = min(len(exits), 1 + step * len(exits) // max(total_steps, 1))
        chosen = sorted(exits)[-n:]
    return sorted(set(chosen) | {num_layers})


def forward_exits(model, ids: torch.Tensor, keep: set[int], drop: list[float] | None):
    """Run the decoder layer by layer; return ``{exit: hidden}`` for the layer counts in ``keep``.

    Args:
        ids: ``(B, T)`` token ids.
        keep: layer counts ``1..L`` whose output hidden states ``(B, T, D)`` are returned.
        drop: per-layer skip probabilities (layer dropout), or ``None`` for no dropout.
    """
    inner = model.model
    h = inner.embed_tokens(ids)  # (B, T, D)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, T)
    cos_sin = inner.rotary_emb(h, pos)
    out = {}
    for i, layer in enumerate(inner.layers):
        if drop is None or torch.rand(()).item() >= drop[i]:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        if i + 1 in keep:
            out[i + 1] = h
    return out


def layerskip_loss(model, ids: torch.Tensor, exits: list[int], weights: list[float],
                   drop: list[float], distill_weight: float) -> torch.Tensor:
    """The early-exit loss with self-distillation for one ``(B, T+1)`` batch (LayerSkip §4.2)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    L = model.config.num_hidden_layers
    states = forward_exits(model, inputs, set(exits), drop)
    norm, head = model.model.norm, model.lm_head
    final_logits = head(norm(states[L])).flatten(0, 1)  # (B*T, V)
    teacher = F.log_softmax(final_logits.detach(), -1)
    total_w = sum(weights[e - 1] for e in exits)
    loss = weights[L - 1] / total_w * F.cross_entropy(final_logits, targets.flatten())
    for e in exits:
        if e == L:
            continue
        logits = head(norm(states[e])).flatten(0, 1)  # (B*T, V)
        ce = F.cross_entropy(logits, targets.flatten())
        kl = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")
        loss = loss + weights[e - 1] / total_w * (ce + distill_weight * kl)
    return loss


@torch.inference_mode()
def evaluate_exits(model, data: torch.Tensor, seq_len: int, num_windows: int) -> dict:
    """Held-out loss and greedy top-1 agreement with the last layer, for every exit ``1..L``.

    Returns ``{"loss": [L floats], "agreement": [L floats], "tokens": n}``; index ``e − 1`` is
    exit ``e``. The windows are evenly spaced over ``data`` (deterministic).
    """
    L = model.config.num_hidden_layers
    starts = torch.linspace(0, len(data) - seq_len - 2, num_windows).long().tolist()
    loss, agree, n = [0.0] * L, [0.0] * L, 0
    for s in starts:
        window = data[s:s + seq_len + 1][None]
        states = forward_exits(model, window[:, :-1], set(range(1, L + 1)), None)
        logits = {e: model.lm_head(model.model.norm(h))[0] for e, h in states.items()}
        final = logits[L].argmax(-1)
        for e in range(1, L + 1):
            loss[e - 1] += F.cross_entropy(logits[e], window[0, 1:], reduction="sum").item()
            agree[e - 1] += (logits[e].argmax(-1) == final).sum().item()
        n += seq_len
    return {"loss": [x / n for x in loss], "agreement": [x / n for x in agree], "tokens": n}


def expected_speedup(alpha: float, exit_layer: int, k: int, num_layers: int) -> float:
    """Ideal speedup of one self-speculative round when a layer call costs the same for 1 or k+1 tokens.

    Tokens per round ``(1 − α^{k+1}) / (1 − α)`` (Leviathan et al. 2023, §3.4); cost per round in
    layer calls ``k·E`` (draft) ``+ E + (L − E)`` (verify) plus ``k + 1`` LM-head calls, against
    ``L + 1`` per token for plain decoding. This is the small-model, overhead-bound regime.
    """
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    cost = k * (exit_layer + 1) + exit_layer + (num_layers - exit_layer) + 1
    return tokens * (num_layers + 1) / cost


def pick_defaults(agreement: list[float], num_layers: int) -> tuple[int, int, float]:
    """Choose ``(exit_layer, num_speculations, expected speedup)`` maximising :func:`expected_speedup`."""
    best = (num_layers // 2, 0, 1.0)
    for e in range(1, num_layers):
        for k in range(1, 9):
            s = expected_speedup(agreement[e - 1], e, k, num_layers)
            if s > best[2]:
                best = (e, k, s)
    return best


def build_model(args, tokenizer):
    """A ``transformers.LlamaForCausalLM`` of the requested shape (tied embeddings, RoPE θ=10 000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=args.seq_len, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args) -> float:
    """Linear warm-up for ``args.warmup`` steps, then cosine decay to 10 % of ``args.lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model, data: torch.Tensor, args) -> float:
    """Run ``args.steps`` optimiser steps of the LayerSkip loss; return the wall time in seconds."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    L = args.layers
    exits = parse_exits(args.exit_layers, L)
    drop = layer_dropout_rates(L, args.p_max)
    weights = exit_weights(L, args.e_scale, args.exit_weighting)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        idx = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([data[i:i + args.seq_len + 1] for i in idx.tolist()])  # (B, T+1)
        active = enabled_exits(step, args.steps, exits, L, args.curriculum, args.rotation)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = layerskip_loss(model, batch, active, weights, drop, args.distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.perf_counter() - start
        tok_s = (step + 1) * args.batch_size * args.seq_len / elapsed
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:.0f}")
    model.eval()
    return time.perf_counter() - start


def parse_exits(spec: str, num_layers: int) -> list[int]:
    """Parse ``"1-8"`` or ``"2,4,6"`` into exit layer counts, each in ``1..L−1``."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    bad = [e for e in out if not 1 <= e < num_layers]
    if bad:
        raise ValueError(f"exit layers must be in 1..{num_layers - 1}, got {sorted(bad)}")
    return sorted(out)


def model_card(args, stats: dict, seconds: float, n_params: int, defaults) -> str:
    """The README.md written next to the checkpoint: command, shape and held-out figures."""
    exit_layer, k, speedup = defaults
    rows = "\n".join(
        f"| {e} | {stats['loss'][e - 1]:.3f} | {100 * stats['agreement'][e - 1]:.1f} % |"
        for e in range(1, args.layers + 1))
    return f"""# layerskip-stdlib

A small Llama-architecture code model trained with the LayerSkip recipe (layer dropout and an
early-exit loss with self-distillation, `models/train.py`) on the Python {sys.version.split()[0]}
standard library's own source files (PSF licence). It exists so that the server works, and is
tested, with no download.

- Shape: {args.layers} layers, hidden size {args.hidden}, {args.heads} attention heads
  ({args.kv_heads} KV heads), MLP {args.intermediate}, vocabulary {stats['vocab_size']}
  (byte-level BPE), context {args.seq_len} tokens, tied embeddings; {n_params / 1e6:.2f}M parameters.
- Training: {args.steps} steps × {args.batch_size} × {args.seq_len} tokens in {seconds / 60:.1f} min
  on {torch.get_num_threads()} CPU threads; train split only (`models/corpus.py`).
- Early-exit loss: exits {args.exit_layers}, {args.curriculum} curriculum (R = {args.rotation}),
  `{args.exit_weighting}` exit weights (e_scale {args.e_scale}), self-distillation weight
  {args.distill_weight}; layer dropout p_max {args.p_max}.
- Made by: `{stats['command']}`

## Held-out figures (`valid` split, {stats['tokens']} tokens)

Exit `e` reads layer `e`'s output through the model's final norm and LM head. Agreement is the
share of positions where the exit's greedy token equals the last layer's: the acceptance rate
that greedy self-speculation at that exit should see.

| exit layer | loss (nats/token) | top-1 agreement with the last layer |
|---|---|---|
{rows}

## Defaults for self-speculation

`generation_config.json` records `assistant_early_exit = {exit_layer}` (the exit layer) and
`num_assistant_tokens = {k}` (the number of speculations), the transformers names; the server reads
them and its `--exit-layer` / `--num-speculations` flags override them. They maximise the ideal
speedup of `models.train.expected_speedup` over these held-out agreements (estimate {speedup:.2f}×,
counting a layer call as equally costly for 1 or k+1 tokens); measured speedups are in the
project README (`bench/speedup.py`, on the separate `test` split).
"""


def save(model, tokenizer, out: Path, defaults, card: str, stats: dict) -> None:
    """Write the Hugging Face folder: config, safetensors weights, tokenizer, generation config."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        assistant_early_exit=defaults[0], num_assistant_tokens=defaults[1], do_sample=False,
    )
    gen.save_pretrained(out)
    (out / "README.md").write_text(card)
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    """The training command's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512, help="training context (tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--p-max", type=float, default=0.1, help="layer dropout rate of the last layer")
    p.add_argument("--e-scale", type=float, default=1.0, help="early-exit loss depth scale")
    p.add_argument("--exit-weighting", choices=["paper", "uniform"], default="paper")
    p.add_argument("--exit-layers", default="1-8", help="exits trained with the early-exit loss")
    p.add_argument("--curriculum", choices=["rotational", "gradual"], default="rotational")
    p.add_argument("--rotation", type=int, default=4, help="R of the rotational curriculum")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows for the card")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files of "
                   "each split (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Entry point of ``python -m models.train``."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(args.vocab, args.max_files)
    train_data = encode_split(tokenizer, "train", args.max_files)
    valid_data = encode_split(tokenizer, "valid", args.max_files)
    print(f"corpus: {len(train_data):,} train tokens, {len(valid_data):,} valid tokens")
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    seconds = train(model, train_data, args)
    stats = evaluate_exits(model, valid_data, args.seq_len, args.eval_windows)
    stats["vocab_size"] = len(tokenizer)
    stats["command"] = "python -m models.train " + " ".join(argv if argv is not None else sys.argv[1:])
    stats["train_seconds"] = seconds
    defaults = pick_defaults(stats["agreement"], args.layers)
    card = model_card(args, stats, seconds, n_params, defaults)
    save(model, tokenizer, args.out, defaults, card, stats)
    print(card)


if __name__ == "__main__":
    main()
