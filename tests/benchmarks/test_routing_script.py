"""benchmarks/routing_gpu.py in its CPU smoke mode, so the GPU script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_checks_every_rule(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "routing_gpu.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "routing_gpu.json").read_text())
    assert report["checks_ok"] and len(report["rows"]) == 5
    assert all(row["tokens_with_other_experts"] == 0 for row in report["rows"])
