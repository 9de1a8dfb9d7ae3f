"""Flag parsing with environment fallbacks, and the metrics arithmetic."""

from engine.loop import FinishedStats, StepStats
from engine.metrics import EngineMetrics
from server.cli import engine_config, parse_args


def test_flags_read_the_environment_and_the_command_line_wins():
    env = {"LAYERSKIP_PORT": "9001", "LAYERSKIP_NUM_SPECULATIONS": "0", "LAYERSKIP_DEVICE": "cuda"}
    args = parse_args(["--device", "cpu"], environ=env)
    assert args.port == 9001 and args.num_speculations == 0 and args.device == "cpu"
    assert args.host == "127.0.0.1" and args.max_num_seqs == 8
    config = engine_config(args)
    assert config.num_speculations == 0 and config.model.endswith("layerskip-stdlib")


def _value(metrics: EngineMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"model_name": "m"})


def test_counters_and_window_gauges():
    metrics = EngineMetrics("m", window_seconds=1000)
    metrics.observe_step(StepStats(num_prompt_tokens=7, num_generation_tokens=5, num_drafts=2,
                                   num_draft_tokens=8, num_accepted_tokens=3, num_running=2,
                                   num_waiting=1,
                                   finished=[FinishedStats(1.5, 0.1, 0.02, "length")]))
    assert _value(metrics, "layerskip_spec_decode_num_draft_tokens_total") == 8
    assert _value(metrics, "layerskip_spec_decode_num_accepted_tokens_total") == 3
    assert _value(metrics, "layerskip_prompt_tokens_total") == 7
    assert _value(metrics, "layerskip_num_requests_waiting") == 1
    assert _value(metrics, "layerskip_spec_decode_acceptance_rate") == 3 / 8
    tokens_per_second = _value(metrics, "layerskip_generation_tokens_per_second")
    assert 5 / 1000 < tokens_per_second  # divided by the server's age, not the whole window
    assert metrics.registry.get_sample_value(
        "layerskip_request_success_total", {"model_name": "m", "finished_reason": "length"}) == 1
    assert b"layerskip_time_to_first_token_seconds_bucket" in metrics.render()


def test_acceptance_gauge_is_zero_without_drafts_and_forgets_old_steps():
    metrics = EngineMetrics("m", window_seconds=10)
    assert _value(metrics, "layerskip_spec_decode_acceptance_rate") == 0.0
    metrics.observe_step(StepStats(num_draft_tokens=4, num_accepted_tokens=4), now=0.0)
    assert _value(metrics, "layerskip_spec_decode_acceptance_rate") == 0.0  # step is long gone
