"""yamllint over every YAML file of the repository, with the repository's .yamllint."""

from __future__ import annotations

from tests.deploy.conftest import ROOT, run, tool


def test_yamllint_passes_on_all_yaml():
    run(tool("yamllint"), "--strict", "--config-file", str(ROOT / ".yamllint"), ".")


def test_yamllint_sees_the_deploy_files():
    listed = run(tool("yamllint"), "--list-files", "--config-file", str(ROOT / ".yamllint"), ".").stdout
    for path in ("deploy/compose.yaml", "deploy/prometheus/prometheus.yml",
                 "deploy/k8s/base/deployment.yaml", "deploy/grafana/provisioning/datasources/prometheus.yaml"):
        assert path in listed, f"yamllint does not lint {path}"
