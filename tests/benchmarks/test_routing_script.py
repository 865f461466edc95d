"""benchmarks/routing_gpu.py in its CPU smoke mode, so the GPU script cannot rot."""

from __future__ import annotations

from tests.benchmarks._smoke import run_smoke


def test_smoke_run_checks_every_rule(tmp_path):
    _, report = run_smoke("routing_gpu.py", tmp_path, "routing_gpu.json")
    assert report["checks_ok"] and len(report["rows"]) == 5
    assert all(row["tokens_with_other_experts"] == 0 for row in report["rows"])
