"""deploy/compose.yaml: valid for Docker Compose, loopback-only ports, GPU, volumes, health checks."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, PROMETHEUS_DIR, run, tool

COMPOSE = DEPLOY / "compose.yaml"
CPU = DEPLOY / "compose.cpu.yaml"


class _Loader(yaml.SafeLoader):
    """Knows compose's merge tags (!reset, !override)."""


_Loader.add_constructor("!reset", lambda loader, node: None)
_Loader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


def load(path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, CPU]], ids=["gpu", "cpu"])
def test_docker_compose_accepts_the_files(files):
    """``docker compose config`` validates against the Compose specification (no engine needed)."""
    args = [a for f in files for a in ("-f", str(f))]
    rendered = yaml.safe_load(run(tool("docker-compose"), *args, "config").stdout)
    server = rendered["services"]["server"]
    if CPU in files:
        assert "deploy" not in server and server["build"]["args"]["VARIANT"] == "cpu"
        assert server["image"].endswith(":cpu")
    else:
        devices = server["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert server["build"]["args"]["VARIANT"] == "cuda"


def test_published_ports_bind_to_loopback_only():
    services = load(COMPOSE)["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_every_service_has_a_healthcheck_and_data_lives_in_named_volumes():
    compose = load(COMPOSE)
    for name, service in compose["services"].items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    named = set(compose["volumes"])
    assert {"prometheus-data", "grafana-data"} <= named
    used = {v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
            if isinstance(v, str)}
    assert named <= used


def test_the_server_mounts_models_read_only_and_passes_only_real_flags():
    from server.cli import FLAGS

    server = load(COMPOSE)["services"]["server"]
    models = next(v for v in server["volumes"] if isinstance(v, dict) and v["target"] == "/models")
    assert models["read_only"] is True
    flags = {"LAYERSKIP_" + name.upper().replace("-", "_") for name, *_ in FLAGS}
    env = [e.split("=")[0] for e in server["environment"]]
    assert set(env) <= flags, set(env) - flags
    assert server["read_only"] is True and "/tmp" in server["tmpfs"]
    grace = int(re.fullmatch(r"(\d+)s", server["stop_grace_period"]).group(1))
    assert grace >= 60
    drain = next(e for e in server["environment"] if e.startswith("LAYERSKIP_TIMEOUT_GRACEFUL_SHUTDOWN="))
    assert float(re.search(r"(\d+)\}?$", drain).group(1)) < grace, "the server must finish draining first"


def test_the_mounted_folders_exist():
    compose = load(COMPOSE)
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_dir(), f"{name} mounts missing {source}"
    assert (DEPLOY / "models").is_dir()
    assert (DEPLOY / load(COMPOSE)["services"]["prometheus"]["volumes"][0].split(":")[0]).resolve() == PROMETHEUS_DIR


def test_the_api_key_passes_through_from_the_shell_only_when_set():
    """Unset, the server starts without authentication; set, the container gets it. The health
    check and Prometheus' scrape use paths that need no key."""
    import os

    from server.auth import is_protected

    base = {k: v for k, v in os.environ.items() if k != "LAYERSKIP_API_KEY"}

    def rendered(extra: dict) -> dict:
        proc = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "config"],
                              capture_output=True, text=True, timeout=120, env={**base, **extra})
        assert proc.returncode == 0, proc.stderr
        return yaml.safe_load(proc.stdout)["services"]["server"]["environment"]

    assert "LAYERSKIP_API_KEY" in load(COMPOSE)["services"]["server"]["environment"]
    assert rendered({"LAYERSKIP_API_KEY": "k1,k2"})["LAYERSKIP_API_KEY"] == "k1,k2"
    assert rendered({})["LAYERSKIP_API_KEY"] is None  # null: not set in the container
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    paths = [job.get("metrics_path", "/metrics") for job in prometheus["scrape_configs"]
             if job["job_name"] == "layerskip"]
    assert paths and not any(is_protected(p) for p in paths)
