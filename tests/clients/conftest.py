"""A live ``layerskip-serve`` on loopback for the third-party client tests, and the rule for
missing client packages.

The clients run fully offline: the bundled checkpoint folder is their tokenizer, and the
subprocesses get ``HF_HUB_OFFLINE=1``, so that any attempt to reach the Hugging Face hub fails at
once instead of waiting on the network.

Client packages (``lm-eval[api]``, ``guidellm``) are not in the ``test`` extra, since they pull a
large dependency tree. Where one is missing, its tests skip on a developer's machine but fail
under CI (``CI`` set in the environment), so that a missing install step cannot pass as green.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# For every subprocess (the server, guidellm). In this process, lm-eval and the reference model
# load only from the bundled folder's path, which never touches the hub.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def require(module: str, pip_name: str):
    """Import ``module``; skip when it is missing, except under CI, where that is a failure."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not installed: pip install '{pip_name}'"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI must install it): {exc}", pytrace=False)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError("layerskip-serve exited:\n" + log.read_text())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"layerskip-serve did not become healthy in {timeout_s:.0f} s")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """``layerskip-serve`` on the bundled model, on a free loopback port; yields its base URL.

    Four sequences per step, so that the clients' concurrent requests also queue. Its output goes
    to a file (a pipe nobody reads would block the server once full of access-log lines).
    """
    beside = Path(sys.executable).with_name("layerskip-serve")  # this interpreter's, venv or not
    command = str(beside) if beside.exists() else shutil.which("layerskip-serve")
    assert command, "the layerskip-serve console script is not installed (pip install -e .)"
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, "LAYERSKIP_PORT": str(port)}
    log = tmp_path_factory.mktemp("serve") / "layerskip-serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([command, "--max-num-seqs", "4"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
