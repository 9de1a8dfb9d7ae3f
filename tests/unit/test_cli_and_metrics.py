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


def test_draft_vocabulary_flags_and_their_environment_twins():
    args = parse_args(["--draft-token-counts", "/tmp/c.json"],
                      environ={"LAYERSKIP_DRAFT_VOCAB_SIZE": "1024"})
    config = engine_config(args)
    assert config.draft_vocab_size == 1024 and config.draft_token_counts == "/tmp/c.json"
    assert engine_config(parse_args([], environ={})).draft_vocab_size is None


def test_empty_environment_values_are_unset_and_bad_ones_are_named(capsys):
    import pytest

    args = parse_args([], environ={"LAYERSKIP_EXIT_LAYER": "", "LAYERSKIP_PORT": " ",
                                   "LAYERSKIP_ADAPTIVE_SPECULATION": "false",
                                   "LAYERSKIP_TIMEOUT_GRACEFUL_SHUTDOWN": "30"})
    assert args.exit_layer is None and args.port == 8000
    assert args.adaptive_speculation is False and args.timeout_graceful_shutdown == 30.0
    assert parse_args(["--adaptive-speculation"], environ={
        "LAYERSKIP_ADAPTIVE_SPECULATION": "0"}).adaptive_speculation is True
    with pytest.raises(SystemExit):
        parse_args([], environ={"LAYERSKIP_MAX_NUM_SEQS": "eight"})
    assert "LAYERSKIP_MAX_NUM_SEQS='eight'" in capsys.readouterr().err


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


def test_speculation_counters_per_position_per_k_and_the_cost_ratio():
    metrics = EngineMetrics("m")
    metrics.observe_step(StepStats(num_accepted_tokens_per_pos=[3, 1], rounds={(4, 2): 1, (0, 0): 2},
                                   draft_verify_cost_ratio=0.4))
    metrics.observe_step(StepStats(num_accepted_tokens_per_pos=[2], rounds={(4, 2): 1}))
    sample = metrics.registry.get_sample_value
    assert sample("layerskip_spec_decode_num_accepted_tokens_per_pos_total",
                  {"model_name": "m", "position": "0"}) == 5
    assert sample("layerskip_spec_decode_num_accepted_tokens_per_pos_total",
                  {"model_name": "m", "position": "1"}) == 1
    assert sample("layerskip_spec_decode_rounds_total",
                  {"model_name": "m", "exit_layer": "4", "num_speculations": "2"}) == 2
    assert sample("layerskip_spec_decode_rounds_total",
                  {"model_name": "m", "exit_layer": "0", "num_speculations": "0"}) == 2
    assert _value(metrics, "layerskip_spec_decode_draft_verify_cost_ratio") == 0.4


def test_inter_token_latency_is_observed_once_per_token():
    metrics = EngineMetrics("m")
    metrics.observe_step(StepStats(inter_token_latencies=[(0.004, 3), (0.02, 1)]))
    count = _value(metrics, "layerskip_inter_token_latency_seconds_count")
    total = _value(metrics, "layerskip_inter_token_latency_seconds_sum")
    assert count == 4 and abs(total - (3 * 0.004 + 0.02)) < 1e-12
    assert metrics.registry.get_sample_value("layerskip_inter_token_latency_seconds_bucket",
                                             {"model_name": "m", "le": "0.005"}) == 3


def test_acceptance_gauge_is_zero_without_drafts_and_forgets_old_steps():
    metrics = EngineMetrics("m", window_seconds=10)
    assert _value(metrics, "layerskip_spec_decode_acceptance_rate") == 0.0
    metrics.observe_step(StepStats(num_draft_tokens=4, num_accepted_tokens=4), now=0.0)
    assert _value(metrics, "layerskip_spec_decode_acceptance_rate") == 0.0  # step is long gone
