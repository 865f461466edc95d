"""benchmarks/reliability_gpu.py in its CPU smoke mode (Triton's interpreter, tiny shapes),
so the GPU script cannot rot: every check runs (those that need CUDA report themselves
skipped) and passes, and the JSON and Markdown reports are written."""

from __future__ import annotations

from tests.benchmarks._smoke import run_smoke

NEEDS_CUDA = {"cuda-graph-layer-forward", "cuda-graph-layer-backward", "cuda-graph-flash", "stream", "memory-estimates"}


def test_smoke_run_passes_every_check(tmp_path):
    _, report = run_smoke("reliability_gpu.py", tmp_path, "reliability_gpu.json")
    outcomes = {check["name"]: check["ok"] for check in report["checks"]}
    assert len(outcomes) == 15
    assert {name for name, ok in outcomes.items() if ok is None} == NEEDS_CUDA
    assert all(ok for name, ok in outcomes.items() if name not in NEEDS_CUDA), outcomes
    assert report["checks_ok"] and report["smoke"]
    assert "| memory-limit-message | pass |" in (tmp_path / "reliability_gpu.md").read_text()
