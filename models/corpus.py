"""The training corpus: the Python standard library's own source files.

Every machine with CPython has them (PSF licence), so the bundled model can be rebuilt anywhere
without a download. The held-out files are a fixed list, ``heldout_files.json`` (paths relative
to the standard-library folder), made once on Python 3.11.7 by hashing each path
(:func:`hash_bucket`); every other file is training data, so a newer Python's new files can only
ever be trained on, never leak into the held-out sets.

- ``train``: about 90 % of the files; the tokenizer and the model see only these.
- ``valid``: about 5 %; the model card's held-out loss and exit agreement, and the choice of the
  default ``exit_layer`` / ``num_speculations``, are computed on these.
- ``test``: about 5 %; only ``bench/speedup.py`` reads these, so the defaults are never tuned
  on the benchmark's prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from pathlib import Path

SPLITS = ("train", "valid", "test")


def stdlib_root() -> Path:
    """Return the folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


HELDOUT_FILE = Path(__file__).resolve().parent / "heldout_files.json"


def hash_bucket(relative_path: str) -> str:
    """The rule that made the held-out lists: ``sha256(path) % 100`` → 0–89 train, 90–94 valid,
    95–99 test."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100
    if bucket < 90:
        return "train"
    return "valid" if bucket < 95 else "test"


@functools.lru_cache(maxsize=1)
def heldout() -> dict[str, frozenset[str]]:
    """The committed held-out lists: ``{"valid": paths, "test": paths}``."""
    data = json.loads(HELDOUT_FILE.read_text())
    return {split: frozenset(data[split]) for split in ("valid", "test")}


def split_of(relative_path: str) -> str:
    """Return the split (``train``/``valid``/``test``) that a file belongs to.

    Args:
        relative_path: the path relative to :func:`stdlib_root`, with ``/`` separators.
    """
    for split, paths in heldout().items():
        if relative_path in paths:
            return split
    return "train"


def stdlib_files(split: str) -> list[Path]:
    """List the standard library's ``.py`` files of one split, sorted by path.

    Third-party packages (``site-packages``) are excluded.

    Raises:
        ValueError: ``split`` is not one of :data:`SPLITS`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if split_of(rel) == split:
            files.append(path)
    return files


def read_text(path: Path) -> str:
    """Read a source file as UTF-8, replacing undecodable bytes (a few test files hold some)."""
    return path.read_bytes().decode("utf-8", errors="replace")
