"""benchmarks/train_curve_gpu.py in its CPU smoke mode, so the GPU script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_curves(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_curve_gpu.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "train_curve_gpu.json").read_text())
    triton, torch_run = report["losses"]["triton"], report["losses"]["torch"]
    assert len(triton) == len(torch_run) == report["steps"]
    # float32 on the CPU: the two backends take the same steps to rounding.
    assert max(abs(a - b) for a, b in zip(triton, torch_run)) < 1e-4
    assert report["agree_within_noise"]
    assert (tmp_path / "train_curve_gpu.png").stat().st_size > 0
