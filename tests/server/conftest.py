"""Fixtures that serve the bundled model: an in-process app and a real ``layerskip-serve``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from engine.client import AsyncEngine
from engine.metrics import EngineMetrics
from server.app import build_app


def make_client(make_core, **config) -> TestClient:
    core = make_core(**config)
    metrics = EngineMetrics(core.model_name)
    return TestClient(build_app(AsyncEngine(core, metrics), metrics))


@pytest.fixture(scope="module")
def client(bundled_model, make_core):
    """The real app on the bundled model with its default speculation settings."""
    with make_client(make_core, model=bundled_model, max_num_seqs=4) as c:
        yield c


@pytest.fixture(scope="module")
def plain_client(bundled_model, make_core):
    """The same app with speculation off (``num_speculations=0``)."""
    with make_client(make_core, model=bundled_model, num_speculations=0, max_num_seqs=4) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server():
    """``layerskip-serve`` as a subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    env = {**os.environ, "LAYERSKIP_PORT": str(port)}
    command = shutil.which("layerskip-serve")
    assert command, "the layerskip-serve console script is not installed (pip install -e .)"
    proc = subprocess.Popen([command, "--max-num-seqs", "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("layerskip-serve exited:\n" + proc.stdout.read())
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("layerskip-serve did not become healthy in 120 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
