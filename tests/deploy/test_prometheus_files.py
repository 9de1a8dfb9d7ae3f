"""promtool on the shipped Prometheus files, and the rules' names against the server's metrics."""

from __future__ import annotations

import yaml

from tests.deploy.conftest import (KNOWN_LABELS, PROMETHEUS_DIR, RULE_FILES, exported_metric_names,
                                   promql_labels, promql_names, run, tool)


def all_rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def test_promtool_checks_the_config_and_its_rule_files():
    out = run(tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")).stdout
    assert f"{len(RULE_FILES)} rule files found" in out


def test_promtool_checks_the_rules():
    run(tool("promtool"), "check", "rules", *map(str, RULE_FILES))


def test_promtool_unit_tests_of_the_alerts_pass():
    run(tool("promtool"), "test", "rules", str(PROMETHEUS_DIR / "tests" / "alerts_test.yml"))


def test_promtool_unit_tests_of_the_recording_rules_pass():
    run(tool("promtool"), "test", "rules", str(PROMETHEUS_DIR / "tests" / "recording_test.yml"))


def test_rules_select_only_metrics_the_server_exports():
    known = exported_metric_names() | {"up"}
    records = {rule["record"] for rule in all_rules() if "record" in rule}
    for rule in all_rules():
        unknown = promql_names(rule["expr"]) - known - records
        assert not unknown, f"{rule.get('record') or rule['alert']} selects unknown {unknown}"
        assert promql_labels(rule["expr"]) <= KNOWN_LABELS, rule["expr"]


def test_the_derived_figures_the_issue_names_are_recorded():
    exprs = {rule["record"]: " ".join(rule["expr"].split()) for rule in all_rules() if "record" in rule}
    accept = exprs["layerskip:spec_decode_acceptance_rate:rate1m"]
    assert accept.index("num_accepted_tokens_total") < accept.index("/") < accept.index("num_draft_tokens_total")
    length = exprs["layerskip:spec_decode_mean_accepted_length:rate1m"]
    assert length.startswith("1 +") and "num_drafts_total" in length
    assert "layerskip_generation_tokens_total" in exprs["layerskip:generation_tokens:rate1m"]
    for name in ("request_prompt_tokens", "request_generation_tokens"):
        assert promql_names(exprs[f"layerskip:{name}:mean1m"]) == {f"layerskip_{name}_sum",
                                                                  f"layerskip_{name}_count"}
    quantiles = {(rule["record"], rule["labels"]["quantile"]) for rule in all_rules()
                 if "histogram_quantile" in rule.get("expr", "")}
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert (f"layerskip:{name}:quantile1m", q) in quantiles
    # each quantile rule reads its own histogram: per token for ITL, per request for TPOT
    sources = {"inter_token_latency_seconds": "layerskip_inter_token_latency_seconds_bucket",
               "time_per_output_token_seconds": "layerskip_request_time_per_output_token_seconds_bucket"}
    for rule in all_rules():
        name = rule.get("record", "").removeprefix("layerskip:").removesuffix(":quantile1m")
        if name in sources:
            assert promql_names(rule["expr"]) == {sources[name]}, rule["expr"]
    for rule in all_rules():
        if "histogram_quantile" in rule.get("expr", ""):
            assert f"histogram_quantile({rule['labels']['quantile']}," in rule["expr"]
            assert "_bucket[" in rule["expr"] and "le)" in rule["expr"]


def test_the_alerts_the_issue_names_exist():
    alerts = {rule["alert"] for rule in all_rules() if "alert" in rule}
    assert {"LayerSkipAcceptanceRateCollapsed", "LayerSkipQueueGrowing"} <= alerts


def test_the_scrape_config_targets_the_compose_server():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "layerskip")
    assert job["static_configs"] == [{"targets": ["server:8000"]}]
    assert job.get("metrics_path", "/metrics") == "/metrics"
