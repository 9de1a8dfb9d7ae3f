"""The Grafana dashboard and provisioning: every panel query names what the server or rules export."""

from __future__ import annotations

import json

import yaml

from tests.deploy.conftest import (DASHBOARD, DEPLOY, KNOWN_LABELS, exported_metric_names, promql_labels,
                                   promql_names, recording_rule_names)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def test_the_dashboard_parses_and_has_panels():
    board = dashboard()
    assert board["uid"] and board["title"]
    assert len(panel_queries(board)) >= 10
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_names_an_exported_metric_or_a_recording_rule():
    known = exported_metric_names() | recording_rule_names() | {"up"}
    board = dashboard()
    queries = panel_queries(board) + [("$model_name", v["query"]["query"])
                                      for v in board["templating"]["list"] if v["type"] == "query"]
    for title, expr in queries:
        expr = expr.replace("label_values(", "(").replace(", model_name)", ")")
        names = promql_names(expr)
        assert names, f"{title}: {expr} selects nothing"
        assert not names - known, f"panel {title!r} queries unknown {names - known}"
        assert promql_labels(expr) <= KNOWN_LABELS, f"panel {title!r}: {expr}"


def test_the_panels_the_issue_asks_for_are_there():
    exprs = " ".join(e for _, e in panel_queries(dashboard()))
    for name in ("layerskip:spec_decode_acceptance_rate:rate1m", "layerskip:spec_decode_mean_accepted_length:rate1m",
                 "layerskip:generation_tokens:rate1m", "layerskip:time_to_first_token_seconds:quantile1m",
                 "layerskip:inter_token_latency_seconds:quantile1m",
                 "layerskip:time_per_output_token_seconds:quantile1m", "layerskip_num_requests_waiting",
                 "layerskip:request_queue_time_seconds:quantile1m", "layerskip:request_prompt_tokens:mean1m",
                 "layerskip:request_generation_tokens:mean1m"):
        assert name in exprs, name


def test_inter_token_latency_is_per_token_and_the_per_request_mean_is_labelled_so():
    queries = panel_queries(dashboard())
    itl = [title for title, expr in queries if "layerskip:inter_token_latency_seconds:quantile1m" in expr]
    tpot = [title for title, expr in queries if "layerskip:time_per_output_token_seconds:quantile1m" in expr]
    assert [t for t in itl if "inter-token" in t.lower()], itl
    assert tpot and all("per-request" in t.lower() and "inter-token" not in t.lower() for t in tpot), tpot
    assert not set(itl) & set(tpot)


def test_panels_use_the_datasource_variable():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_provisioning_points_at_the_compose_paths():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"]["grafana"]["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/layerskip.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / mounts[path] / DASHBOARD.name).is_file()
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == (DEPLOY / "grafana/provisioning").resolve()
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
