"""benchmarks/train_curve_gpu.py in its CPU smoke mode, so the GPU script cannot rot."""

from __future__ import annotations

from tests.benchmarks._smoke import run_smoke


def test_smoke_run_writes_curves(tmp_path):
    _, report = run_smoke("train_curve_gpu.py", tmp_path, "train_curve_gpu.json")
    triton, torch_run = report["losses"]["triton"], report["losses"]["torch"]
    assert len(triton) == len(torch_run) == report["steps"]
    # float32 on the CPU: the two backends take the same steps to rounding.
    assert max(abs(a - b) for a, b in zip(triton, torch_run)) < 1e-4
    assert report["agree_within_noise"]
    assert (tmp_path / "train_curve_gpu.png").stat().st_size > 0
