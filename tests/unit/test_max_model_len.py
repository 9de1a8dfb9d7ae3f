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


def test_the_new_flags_have_environment_twins():
    from server.cli import engine_config, parse_args

    config = engine_config(parse_args([], environ={"LAYERSKIP_MAX_WAITING_REQUESTS": "16",
                                                   "LAYERSKIP_ALLOW_LONG_MAX_MODEL_LEN": "1",
                                                   "LAYERSKIP_MAX_NUM_BATCHED_TOKENS": "64"}))
    assert config.max_waiting_requests == 16 and config.allow_long_max_model_len
    assert config.max_num_batched_tokens == 64
    default = engine_config(parse_args([], environ={}))
    assert default.max_waiting_requests == 1024 and not default.allow_long_max_model_len
    assert engine_config(parse_args(["--max-waiting-requests", "0"], environ={})
                         ).max_waiting_requests is None
