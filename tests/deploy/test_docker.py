"""The image: Dockerfile lint and shape, the build context, the install and health-check scripts.

No Docker engine runs on CI's machines, so the image itself is never built here; what the build
runs is: ``scripts/install.sh`` (test_install_script_builds_a_working_install, in CI) and
``scripts/healthcheck.py``.
"""

from __future__ import annotations

import fnmatch
import http.server
import os
import re
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.conftest import PYTHON, ROOT, python_env, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that ships)."""
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_hadolint_finds_nothing():
    run(tool("hadolint"), "--failure-threshold", "warning", str(DOCKERFILE))


def test_shell_scripts_pass_shellcheck():
    run(tool("shellcheck"), "scripts/install.sh", ".ci/run")


def test_the_cuda_base_is_a_pinned_runtime_image_and_torch_is_in_the_projects_range():
    froms = [args for op, args in instructions() if op == "FROM"]
    cuda = [f for f in froms if f.startswith("nvidia/cuda:")]
    assert cuda and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+ AS base-cuda", cuda[0])
    cuda_version = re.match(r"nvidia/cuda:(\d+)\.(\d+)", cuda[0]).groups()
    index = re.search(r"TORCH_INDEX_URL=(\S+)", DOCKERFILE.read_text().split("AS base-cpu")[0]).group(1)
    assert index.endswith("/whl/cu" + "".join(cuda_version)), "torch's CUDA build must match the base image"
    spec = re.search(r"ARG TORCH_SPEC=(\S+)", DOCKERFILE.read_text()).group(1)
    version = next(iter(Requirement(spec).specifier)).version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("torch"))
    assert torch_req.specifier.contains(version), f"{spec} is outside the project's {torch_req}"
    assert any(f.startswith("ubuntu:") for f in froms), "the CPU variant's base"


def test_the_runtime_stage_runs_the_server_as_a_non_root_user():
    stage = runtime_stage()
    ops = {op: args for op, args in stage}
    assert re.fullmatch(r"\d+(:\d+)?", ops["USER"]) and not ops["USER"].startswith("0"), ops["USER"]
    assert ops["EXPOSE"] == "8000"
    assert ops["ENTRYPOINT"].startswith("[") and ops["ENTRYPOINT"].endswith('layerskip-serve"]'), \
        "an exec-form entrypoint, so that docker run IMAGE --flag passes flags through"
    assert "CMD" not in ops
    assert "layerskip-healthcheck" in ops["HEALTHCHECK"]
    env = " ".join(args for op, args in stage if op == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "LAYERSKIP_HOST=0.0.0.0", "LAYERSKIP_PORT=8000", "HOME=/tmp"):
        assert setting in env
    assert "mkdir /models" in " ".join(args for op, args in stage if op == "RUN")


def test_the_build_runs_the_install_script():
    runs = [args for op, args in instructions() if op == "RUN"]
    assert any("scripts/install.sh /opt/venv" in r for r in runs)
    assert any("/opt/venv" in args for op, args in runtime_stage() if op == "COPY")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, with /) out of the build context."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        hit = any(fnmatch.fnmatchcase(p, pattern) or
                  (pattern.startswith("**/") and fnmatch.fnmatchcase(p.split("/")[-1], pattern[3:]))
                  for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_build_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    context = [p for p in tracked if not dockerignore_excludes(p, patterns)]
    for path in (".git/config", "tests/conftest.py", "server/__pycache__/app.cpython-311.pyc",
                 "bench/speedup.py", "x.egg-info/PKG-INFO"):
        assert dockerignore_excludes(path, patterns), path
    assert not [p for p in context if p.startswith(("tests/", "bench/", "deploy/", ".ci/"))]
    copies = [args.split() for op, args in instructions() if op == "COPY" and "--from" not in args]
    for args in copies:
        for source in [a for a in args[:-1] if not a.startswith("--")]:
            assert any(p == source.rstrip("/") or p.startswith(source.rstrip("/") + "/") for p in context), \
                f"COPY {source} is missing from the build context"
    size = sum((ROOT / p).stat().st_size for p in context)
    assert size < 64 * 2**20, f"build context of {size / 2**20:.0f} MiB"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_the_health_check_follows_the_health_endpoint(status, healthy):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "LAYERSKIP_PORT": str(server.server_port)}
        proc = subprocess.run([PYTHON, "scripts/healthcheck.py"], cwd=ROOT, env=env, timeout=30)
        assert (proc.returncode == 0) == healthy
    finally:
        server.shutdown()
        server.server_close()


def test_the_health_check_fails_when_nothing_listens():
    from tests.deploy.conftest import free_port

    env = {**os.environ, "LAYERSKIP_PORT": str(free_port())}
    assert subprocess.run([PYTHON, "scripts/healthcheck.py"], cwd=ROOT, env=env, timeout=30).returncode == 1


@pytest.mark.skipif(not os.environ.get("CI") and not os.environ.get("LAYERSKIP_TEST_INSTALL"),
                    reason="builds a virtual environment (about a minute); runs in CI, or set LAYERSKIP_TEST_INSTALL=1")
def test_install_script_builds_a_working_install(tmp_path):
    """The Dockerfile's install step on this machine: torch==2.13.0 (the local CPU wheel) and a
    non-editable install into a fresh venv; the script then checks ``layerskip-serve --help``
    and that the bundled model's files arrived as package data and load."""
    venv = tmp_path / "venv"
    env = {**python_env(), "TORCH_SPEC": "torch==2.13.0"}
    env.pop("TORCH_INDEX_URL", None)
    proc = subprocess.run(["bash", "scripts/install.sh", str(venv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "install.sh: ok: torch 2.13.0" in proc.stderr
    installed = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                     "import models.loader as m; print(m.BUNDLED_MODEL)"],
                                    cwd="/", capture_output=True, text=True, check=True).stdout.strip())
    assert installed.is_relative_to(venv) and (installed / "model.safetensors").is_file()
