"""The batching engine: the middle of the flow in docs/ARCHITECTURE.md §1.

``client`` (the asyncio boundary) → ``loop`` (``step() = schedule → run → update → emit``) →
``scheduler`` (continuous batching over integers) and ``spec_decode`` (the self-speculative round
over ``kv_cache``) → ``sampler`` (acceptance rule) → ``outputs`` (stop checks, ``detokenizer``)
→ ``metrics`` (the one module that talks to Prometheus). This package file imports nothing, so
importing ``engine.config`` or ``engine.request`` does not load torch.
"""
