"""Weights and math: the bottom of the flow in docs/ARCHITECTURE.md §1.

``llama`` is our Llama forward with layer ranges over a shared KV cache; ``loader`` reads a local
Hugging Face checkpoint folder; ``train`` and ``corpus`` are the LayerSkip recipe that built the
bundled checkpoint in ``layerskip-stdlib/``. Nothing here knows about requests or batching policy.
"""

from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent / "layerskip-stdlib"
"""The bundled checkpoint folder (here, so that naming it never imports torch: the API process
does not)."""
