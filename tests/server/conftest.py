"""Fixtures that serve the bundled model: an in-process app and a real ``layerskip-serve``."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from engine.client import AsyncEngine
from engine.metrics import EngineMetrics
from server.app import build_app
from tests.conftest import serve


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


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """``layerskip-serve`` as a subprocess on a free loopback port; yields its base URL."""
    with serve(tmp_path_factory.mktemp("serve") / "layerskip-serve.log", "--max-num-seqs", "4") as url:
        yield url
