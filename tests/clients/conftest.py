"""A live ``layerskip-serve`` on loopback for the third-party client tests, and the rule for
missing client packages.

The clients run fully offline: the bundled checkpoint folder is their tokenizer, and the
subprocesses get ``HF_HUB_OFFLINE=1``, so that any attempt to reach the Hugging Face hub fails at
once instead of waiting on the network.

The client packages (``lm-eval[api]``, ``guidellm``) come with the ``test`` extra. Where one is
missing anyway, its tests skip on a developer's machine but fail under CI (``CI`` set in the
environment), so that a missing install step cannot pass as green.
"""

from __future__ import annotations

import importlib
import os

import pytest

from tests.conftest import serve

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


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """``layerskip-serve`` on the bundled model, on a free loopback port; yields its base URL.

    Four sequences per step, so that the clients' concurrent requests also queue. Its output goes
    to a file (a pipe nobody reads would block the server once full of access-log lines).
    """
    log = tmp_path_factory.mktemp("serve") / "layerskip-serve.log"
    with serve(log, "--max-num-seqs", "4", env=OFFLINE_ENV) as url:
        yield url
