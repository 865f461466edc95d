"""Run a GPU check-and-time script of ``benchmarks/`` in its CPU ``--smoke`` mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(
    script: str, out: Path, report: str, *args: str, checks_pass: bool = True
) -> tuple[subprocess.CompletedProcess, dict]:
    """``python3 benchmarks/<script> --smoke --out <out> [args]`` under Triton's interpreter,
    with no GPU visible; returns the finished process and the JSON report ``out/<report>``.
    ``checks_pass=False``: the script may exit 1 (a failed check), not otherwise."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *args],
        cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    allowed = (0,) if checks_pass else (0, 1)
    assert result.returncode in allowed, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / report).read_text())
