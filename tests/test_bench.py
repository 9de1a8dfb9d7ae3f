"""``bench/speedup.py`` runs end to end (a tiny run: the figures themselves belong to the README)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speedup_benchmark_runs_and_reports_equal_outputs(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speedup.py"), "--num-prompts", "2",
         "--max-tokens", "8", "--prompt-tokens", "32", "--split", "valid", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "speedup:" in proc.stdout and "acceptance rate:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["greedy_mismatches"] == 0 and result["tokens"] == 16
    assert 0.0 <= result["acceptance_rate"] <= 1.0
