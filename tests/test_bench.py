"""``bench/speedup.py`` runs end to end (a tiny run: the figures themselves belong to the README)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_speedup_benchmark_runs_and_reports_equal_outputs(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speedup.py"), "--num-prompts", "2",
         "--max-tokens", "8", "--prompt-tokens", "32", "--split", "valid", "--repeats", "1", "--out", str(out),
         "--no-adaptive-speculation"],  # adaptive may rightly draft nothing on a loaded machine
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "speedup:" in proc.stdout and "acceptance rate:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["greedy_mismatches"] == 0 and result["tokens"] == 16
    assert 0.0 <= result["acceptance_rate"] <= 1.0


def test_a_30_s_soak_has_no_errors_and_no_greedy_mismatches(tmp_path):
    """``bench/soak.py`` for 30 s at concurrency 4 with its default mix (greedy, streamed, plain,
    chat, sampled, echo with logprobs, dropped streams) against a server it starts: every
    response is a 200, every greedy text equals plain decoding, and once idle the running and
    waiting gauges are 0."""
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "30",
                           "--num-prompts", "8", "--concurrency", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["non_200"] == 0, report["non_200_examples"]
    assert report["transport_errors"] == 0, report["transport_error_examples"]
    assert report["greedy_mismatches"] == 0, report["mismatch_examples"]
    assert report["requests"] > 20 and set(report["requests_by_kind"]) >= {"greedy", "stream", "echo"}
    assert report["idle_gauges"] == {"layerskip_num_requests_running": 0.0,
                                     "layerskip_num_requests_waiting": 0.0}
    assert report["rss_mib_end"]["total"] > 0 and report["server_exit_code"] == 0
    assert proc.returncode == 0


def test_prefix_cache_benchmark_serves_the_shared_prefix_from_the_cache(tmp_path):
    """``bench/prefix_cache.py``, one client, one repeat: the cached server reports the common
    prefix as cached tokens, the uncached one none, and both give the same texts."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prefix_cache.py"),
                           "--concurrency", "1", "--repeats", "1", "--max-tokens", "4",
                           "--prompts-per-client", "1", "--port", str(free_port()),
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "prefix-cache.json").read_text())
    assert report["mismatches"] == 0
    share = {(r["mode"], r["prefix_caching"]): r["cached_share"] for r in report["rows"]}
    assert share[("plain", "uncached")] == share[("spec", "uncached")] == 0
    assert share[("plain", "cached")] > 0.9 and share[("spec", "cached")] > 0.9
    assert (tmp_path / "prefix-cache.png").exists()


def test_the_gpu_check_dry_run_on_the_cpu(tmp_path):
    """``bench/gpu_check.py --device cpu --quick``: the CUDA tests (all skipped here), the
    speedup pairs eager and "graphed" (eager on the CPU) with equal greedy outputs, and the
    roofline run on tiny stand-ins through the graph runner's padded path, into one JSON."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check-cpu-quick.json").read_text())
    assert report["cuda_tests"]["returncode"] == 0
    assert {(r["batch_size"], r["enforce_eager"]) for r in report["speedup"]} == {
        (1, True), (1, False), (2, True), (2, False)}
    assert all(r["greedy_mismatches"] == 0 for r in report["speedup"])
    assert [r["model"] for r in report["roofline"]] == ["llama-3.2-1b", "llama-2-7b"]
    for r in report["roofline"]:
        assert r["exit_layer"] == r["num_layers"] // 4
        for mode in ("eager", "graphed"):
            assert r[mode]["plain_tokens_per_second"] > 0 and r[mode]["draft_step_ms"] > 0
            assert set(r[mode]["ideal"]) == {str(a) for a in report["acceptance_rates"]}
    assert "ideal speedup" in proc.stdout


def test_the_paged_kv_benchmark_pairs_two_trees_and_prints_every_arm():
    """``bench/paged_kv.py`` against this very revision (``--baseline HEAD``, so any clone has
    it): both workers start, every arm gets its paired units and a ratio with its interval, and
    the temporary worktree is gone afterwards."""
    before = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True,
                            text=True).stdout
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "paged_kv.py"), "--baseline",
                           "HEAD", "--repeats", "1", "--max-tokens", "4", "--prompt-len", "32"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0] + " " + line.split()[1]: line.split()
            for line in proc.stdout.splitlines() if line.startswith(("plain", "spec"))}
    assert set(rows) == {"plain b=1", "spec b=1", "plain b=8"}
    assert rows["plain b=1"][2] == "16" and rows["plain b=8"][2] == "4"  # units
    assert all(float(r[5]) > 0 for r in rows.values())  # paged/static
    after = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True,
                           text=True).stdout
    assert after == before


def test_serving_benchmark_quick_run_matches_the_engine_and_reports_intervals(tmp_path):
    """``bench/serve.py --quick``: the engine in-process and the live server give the same texts,
    and every row carries a ratio inside its bootstrap interval."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick",
                           "--sets", "ood", "--repeats", "2", "--port", str(free_port()),
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["mismatches"] == 0
    rows = report["rows"]
    assert {(r["mode"], r["target"], r["concurrency"]) for r in rows} == {
        (m, t, c) for m in ("plain", "spec") for t in ("engine", "http", "http-stream")
        for c in (1, 4)}
    for r in rows:
        assert r["tokens_per_second"] > 0 and len(r["runs_tokens_per_second"]) == 2
        for key in ("vs_engine", "spec_vs_plain"):
            lo, hi = r[key + "_interval"]
            assert lo <= r[key] <= hi
        assert r["vs_engine"] == 1.0 if r["target"] == "engine" else r["vs_engine"] > 0
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert "/engine [95 %]" in proc.stdout


def test_the_round_cost_benchmark_prints_every_batch_size_and_k(tmp_path):
    """``bench/round_costs.py`` on a short run: a row per (batch size, k) with positive timings,
    and the ceiling equal to the work ratio times the ideal (the figures themselves belong to the
    README)."""
    out = tmp_path / "rounds.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "round_costs.py"), "--batch-sizes",
                           "1,2", "--ks", "1,2", "--context", "40", "--repeats", "3", "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_size"], r["k"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["plain_ms"] > 0 and r["round_over_plain"] > 0 and r["verify_over_plain"] > 0
               for r in rows)
    assert all(abs(r["work_ratio"] * r["ideal"] - r["ceiling"]) < 1e-9 for r in rows)
