"""``max_model_len`` against the model's context, checked at start-up (vLLM's rule)."""

import pytest

from engine.config import EngineConfig
from engine.loop import _max_model_len


def test_a_length_past_the_context_needs_asking_for():
    with pytest.raises(ValueError, match="--allow-long-max-model-len"):
        _max_model_len(EngineConfig(model="m", max_model_len=100_000), 512)
    assert _max_model_len(EngineConfig(model="m", max_model_len=100_000,
                                       allow_long_max_model_len=True), 512) == 100_000
    assert _max_model_len(EngineConfig(model="m", max_model_len=512), 512) == 512
    assert _max_model_len(EngineConfig(model="m"), 512) == 512
    assert _max_model_len(EngineConfig(model="m"), 131072) == 8192
    with pytest.raises(ValueError, match="at least 1"):
        _max_model_len(EngineConfig(model="m", max_model_len=0), 512)
