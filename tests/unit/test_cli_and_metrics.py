"""Flag parsing with environment fallbacks, and the metrics arithmetic."""

from engine.stats import FinishedStats, StepStats
from engine.metrics import EngineMetrics, build_1_2_5_buckets
from server.cli import engine_config, parse_args


def test_flags_read_the_environment_and_the_command_line_wins():
    env = {"LAYERSKIP_PORT": "9001", "LAYERSKIP_NUM_SPECULATIONS": "0", "LAYERSKIP_DEVICE": "cuda"}
    args = parse_args(["--device", "cpu"], environ=env)
    assert args.port == 9001 and args.num_speculations == 0 and args.device == "cpu"
    assert args.host == "127.0.0.1" and args.max_num_seqs == 16
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


def _one_line_exit(capsys, argv, environ=None) -> str:
    import pytest

    with pytest.raises(SystemExit) as exc:
        parse_args(argv, environ=environ or {})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("layerskip-serve: error: "), err
    return err


def test_bad_values_are_one_line_and_exit_2(capsys):
    assert "invalid choice: 'loud'" in _one_line_exit(capsys, ["--log-level", "loud"])
    assert "'tpu' is not a device" in _one_line_exit(capsys, ["--device", "tpu"])
    assert "--dtype" in _one_line_exit(capsys, ["--dtype", "float64"])
    err = _one_line_exit(capsys, [], {"LAYERSKIP_LOG_LEVEL": "loud"})
    assert "LAYERSKIP_LOG_LEVEL='loud'" in err and "debug" in err
    assert "LAYERSKIP_DEVICE='tpu'" in _one_line_exit(capsys, [], {"LAYERSKIP_DEVICE": "tpu"})
    assert "LAYERSKIP_DTYPE" in _one_line_exit(capsys, [], {"LAYERSKIP_DTYPE": "int4"})
    assert parse_args([], environ={"LAYERSKIP_LOG_LEVEL": "DEBUG"}).log_level == "debug"
    assert parse_args(["--device", "cuda:1"], environ={}).device == "cuda:1"


def test_version_and_a_help_written_for_users(capsys):
    import re

    import pytest

    from server import package_version

    with pytest.raises(SystemExit) as exc:
        parse_args(["--version"], environ={})
    assert exc.value.code == 0 and capsys.readouterr().out == f"layerskip-serve {package_version()}\n"
    with pytest.raises(SystemExit):
        parse_args(["--help"], environ={"LAYERSKIP_MAX_NUM_SEQS": "3"})
    text = " ".join(capsys.readouterr().out.split())
    assert "OpenAI-compatible inference server" in text and "LayerSkip self-speculation" in text
    assert "--dtype {auto,float32,float16,bfloat16}" in text and "--device {cpu,cuda,cuda:N}" in text
    assert "--log-level {critical,error,warning,info,debug}" in text
    assert "(default: 3) [env LAYERSKIP_MAX_NUM_SEQS]" in text  # the environment's default shown
    assert "(default: 127.0.0.1)" in text and "(default: 16777216)" in text
    assert not re.search(r"default: None", text)


def test_api_keys_repeat_or_comma_separate_and_the_command_line_wins():
    assert parse_args([], environ={}).api_key == []
    assert parse_args([], environ={"LAYERSKIP_API_KEY": " k1, k2 ,"}).api_key == ["k1", "k2"]
    args = parse_args(["--api-key", "a", "--api-key", "b"], environ={"LAYERSKIP_API_KEY": "k1"})
    assert args.api_key == ["a", "b"] and args.protect_metrics is False
    assert parse_args(["--protect-metrics"], environ={}).protect_metrics is True


def test_request_histograms_observe_queue_time_and_token_counts_per_finished_request():
    metrics = EngineMetrics("m", max_model_len=512)
    metrics.observe_step(StepStats(finished=[FinishedStats(1.5, 0.1, 0.02, "length", 0.7, 23, 40),
                                             FinishedStats(0.5, None, None, "abort", 0.5, 3, 0)]))
    assert _value(metrics, "layerskip_request_queue_time_seconds_count") == 2
    assert _value(metrics, "layerskip_request_queue_time_seconds_sum") == 1.2
    assert _value(metrics, "layerskip_request_prompt_tokens_sum") == 26
    assert _value(metrics, "layerskip_request_generation_tokens_sum") == 40
    assert metrics.registry.get_sample_value("layerskip_request_generation_tokens_bucket",
                                             {"model_name": "m", "le": "50.0"}) == 2
    assert metrics.registry.get_sample_value("layerskip_request_queue_time_seconds_bucket",
                                             {"model_name": "m", "le": "0.5"}) == 1
    assert b"_created" not in metrics.render()


def test_token_buckets_are_vllms_1_2_5_series_up_to_max_model_len():
    assert build_1_2_5_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert build_1_2_5_buckets(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert build_1_2_5_buckets(1) == [1]
