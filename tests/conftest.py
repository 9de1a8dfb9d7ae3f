"""Shared fixtures: the bundled model, a tiny random checkpoint, and an engine driver."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.loop import EngineCore
from engine.request import EngineRequest
from models.loader import BUNDLED_MODEL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def bundled_model() -> str:
    """The committed LayerSkip checkpoint folder."""
    assert (BUNDLED_MODEL / "model.safetensors").exists(), "the bundled checkpoint is missing"
    return str(BUNDLED_MODEL)


# One intra-op thread: at these model sizes a second thread buys nothing, and on a shared or
# loaded machine OpenMP's spinning threads make small ops 10-20x slower.
torch.set_num_threads(1)


def make_tiny_checkpoint(folder, num_layers=4, hidden=64, heads=4, kv_heads=2, seed=0, init_std=0.2,
                         **extra):
    """Save a random ``LlamaForCausalLM`` with the bundled tokenizer into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        **extra)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so argmaxes are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, init_std)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(BUNDLED_MODEL / name, folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 4-layer random Llama (GQA, untied head) with the bundled tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def make_cache(model, num_seqs: int, num_tokens: int, block_size: int = 4, scramble: bool = True):
    """A paged :class:`engine.kv_cache.KVCache` for ``num_seqs`` sequences of ``num_tokens``
    positions, and each sequence's block table; ``scramble`` hands the blocks out in a shuffled
    order, so that no table is consecutive (the gather path) and indexing mistakes show."""
    from engine.kv_cache import KVCache, blocks_for

    s, nb = model.shape, blocks_for(num_tokens, block_size)
    ids = list(range(1, num_seqs * nb + 1))  # block 0 stays unused: it is the tables' padding
    if scramble:
        random.Random(0).shuffle(ids)
    cache = KVCache(s.num_layers, num_seqs * nb + 1, block_size, s.num_kv_heads, s.head_dim,
                    model.dtype, model.device)
    return cache, [ids[i * nb:(i + 1) * nb] for i in range(num_seqs)]


def tables(cache, block_tables: list[list[int]]):
    """``models.llama.BlockTables`` of some sequences' block tables."""
    from models.llama import BlockTables

    return BlockTables.build(block_tables, cache.block_size, cache.k[0].device)


def run_engine(core: EngineCore, prompts: list[list[int]], max_tokens: int | list[int] = 24,
               arrive_at: list[int] | None = None, **request_kwargs) -> dict[str, list]:
    """Drive ``core`` step by step; request ``i`` is added before step ``arrive_at[i]``.

    ``max_tokens`` is one value for all requests or one per request.
    Returns ``{request_id: [RequestOutput, ...]}``.
    """
    arrive_at = arrive_at or [0] * len(prompts)
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    pending = list(range(len(prompts)))
    outputs: dict[str, list] = {f"r{i}": [] for i in pending}
    step = 0
    while pending or core.has_work():
        for i in [i for i in pending if arrive_at[i] <= step]:
            core.add_request(EngineRequest(f"r{i}", tuple(prompts[i]), max_tokens[i],
                                           **request_kwargs))
            pending.remove(i)
        if core.has_work():
            for out in core.step()[0]:
                outputs[out.request_id].append(out)
        step += 1
    return outputs


def scripted_plan(core, seed: int = 0):
    """Replace the controller's plan with random per-row ``k`` in ``0..k_max`` every round, so
    rows switch between plain decoding and every draft length mid-sequence."""
    rng = random.Random(seed)
    core.policy.plan = lambda states, rooms, exit_layer, k_max, sampled=False: [
        min(rng.randint(0, k_max), r) for r in rooms]
    return core


def tokens_of(outputs: dict[str, list]) -> dict[str, list[int]]:
    """Each request's generated tokens, from :func:`run_engine`'s outputs."""
    return {rid: [t for o in outs for t in o.token_ids] for rid, outs in outputs.items()}


@pytest.fixture(scope="session")
def make_core():
    """Build an :class:`EngineCore` from keyword arguments of :class:`EngineConfig`."""
    return lambda **kwargs: EngineCore(EngineConfig(**kwargs))


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(log: Path, *args: str, env: dict | None = None, timeout_s: float = 120):
    """``layerskip-serve *args`` (this interpreter's console script) on a free loopback port,
    logging to ``log`` (a pipe nobody reads would block the server once full of access-log
    lines); yields its base URL once ``/health`` answers 200, and stops it afterwards."""
    with serve_process(log, *args, env=env, timeout_s=timeout_s) as (url, _):
        yield url


@contextlib.contextmanager
def serve_process(log: Path, *args: str, env: dict | None = None, timeout_s: float = 120):
    """:func:`serve`, yielding ``(url, proc)``; afterwards it checks that the server and its
    engine process are both gone (no orphan process, ever)."""
    import httpx
    import psutil

    beside = Path(sys.executable).with_name("layerskip-serve")  # this interpreter's, venv or not
    command = str(beside) if beside.exists() else shutil.which("layerskip-serve")
    assert command, "the layerskip-serve console script is not installed (pip install -e .)"
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([command, *args], env={**os.environ, **(env or {}),
                                                       "LAYERSKIP_PORT": str(port)},
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    children = []
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError("layerskip-serve exited:\n" + log.read_text())
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"layerskip-serve did not become healthy in {timeout_s:.0f} s")
            time.sleep(0.3)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        _gone, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()
        assert not alive, f"processes left behind by layerskip-serve: {[c.pid for c in alive]}"
