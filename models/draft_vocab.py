"""A frequency-ranked draft vocabulary (FR-Spec, Zhao et al. 2025, arXiv 2502.14856).

The draft's LM head only scores the ``N`` most frequent tokens of a text: its cost falls from
``V × D`` to ``N × D`` multiply-adds per token, while the verifier keeps the full head, so
self-speculation stays exact (a token outside the set is never proposed; under sampling the
draft's ``q`` is 0 outside it). The token counts are a JSON file,

    {"source": "...", "tokens": <total>, "counts": [count of token 0, count of token 1, ...]}

and the bundled checkpoint ships ``draft_vocab.json``, counted over its own training split (the
text the model and its tokenizer saw; never the ``valid`` or ``test`` split) by

    python -m models.draft_vocab --out models/layerskip-stdlib/draft_vocab.json

which uses ``models.train.encode_split`` (every train file, each followed by EOS). For any other
checkpoint ``python -m models.draft_vocab --model DIR --text FILE... --out counts.json`` counts a
text the user names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DRAFT_VOCAB_FILE = "draft_vocab.json"


def load_counts(path: str | Path) -> tuple[list[int], int | None]:
    """A counts file's per-token counts (one per token id) and its ``draft_vocab_size`` (the
    ``N`` measured for that checkpoint), or None when it names none.

    Raises:
        ValueError: the file is not JSON with a ``counts`` list of non-negative integers.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a token-counts file: {e}") from None
    counts = data.get("counts") if isinstance(data, dict) else None
    if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"{path}: expected {{'counts': [non-negative ints, one per token id]}}")
    size = data.get("draft_vocab_size")
    return counts, size if isinstance(size, int) and size > 0 else None


def top_tokens(counts: list[int], size: int, vocab_size: int, always: frozenset[int] = frozenset()
               ) -> torch.Tensor:
    """The ids of the ``size`` most frequent tokens (ties by id), ``always`` included, sorted by id.

    Args:
        counts: per-token counts (ids past ``len(counts)`` count 0).
        size: ``N``, at most ``vocab_size``.
        always: ids kept whatever their count (e.g. EOS).

    Returns:
        ``(N',)`` long tensor, ``N' ≥ size`` only when ``always`` adds ids.
    """
    padded = list(counts[:vocab_size]) + [0] * max(0, vocab_size - len(counts))
    ranked = sorted(range(vocab_size), key=lambda t: (-padded[t], t))
    chosen = set(ranked[:size]) | set(always)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def coverage(counts: list[int], ids: torch.Tensor) -> float:
    """The share of the counted tokens that fall inside ``ids`` (0..1)."""
    total = sum(counts)
    return sum(counts[i] for i in ids.tolist() if i < len(counts)) / total if total else 0.0


def count_split(tokenizer, split: str = "train") -> list[int]:
    """Token counts of one corpus split, encoded as the training recipe does."""
    from models.train import encode_split

    ids = encode_split(tokenizer, split)
    return torch.bincount(ids, minlength=len(tokenizer)).tolist()


def count_texts(tokenizer, paths: list[Path]) -> list[int]:
    """Token counts of the given text files."""
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    for path in paths:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(tokenizer))
    return counts.tolist()


def main(argv=None) -> None:
    """Write a counts file for the bundled model's training split, or for named texts."""
    from models.loader import BUNDLED_MODEL
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="checkpoint folder (its tokenizer)")
    p.add_argument("--text", nargs="*", type=Path, default=None,
                   help="text files to count (default: the corpus's train split)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.text:
        counts, source = count_texts(tokenizer, args.text), [str(t) for t in args.text]
    else:
        counts, source = count_split(tokenizer, "train"), "models.corpus train split (encode_split)"
    args.out.write_text(json.dumps({"source": source, "tokens": sum(counts), "counts": counts},
                                   separators=(",", ":")) + "\n")
    print(f"wrote {args.out}: {sum(counts)} tokens, {sum(c > 0 for c in counts)} distinct")


if __name__ == "__main__":
    main()
