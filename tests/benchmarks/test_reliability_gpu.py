"""benchmarks/reliability_gpu.py in its CPU smoke mode (Triton's interpreter, tiny shapes),
so the GPU script cannot rot: every check runs (those that need CUDA report themselves
skipped) and passes, and the JSON and Markdown reports are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEEDS_CUDA = {"cuda-graph-layer-forward", "cuda-graph-layer-backward", "cuda-graph-flash", "stream", "memory-estimates"}


def test_smoke_run_passes_every_check(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reliability_gpu.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "reliability_gpu.json").read_text())
    outcomes = {check["name"]: check["ok"] for check in report["checks"]}
    assert len(outcomes) == 15
    assert {name for name, ok in outcomes.items() if ok is None} == NEEDS_CUDA
    assert all(ok for name, ok in outcomes.items() if name not in NEEDS_CUDA), outcomes
    assert report["checks_ok"] and report["smoke"]
    assert "| memory-limit-message | pass |" in (tmp_path / "reliability_gpu.md").read_text()
