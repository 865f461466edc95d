"""``benchmarks/expert_parallel_gpu.py --smoke`` runs on the CPU (2 Gloo ranks it spawns itself)
and writes a report whose checks pass, so the GPU script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "expert_parallel_gpu.py"


def test_gpu_script_smoke_mode(tmp_path: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "expert_parallel_gpu.json").read_text())
    assert report["world_size"] == 2 and report["comm_backend"] == "gloo" and report["all_checks_pass"]
    assert [c["shape"] for c in report["checks"]] == ["smoke-shared", "smoke-uneven-empty-rank"]
    assert all(c["ok"] and c["worst_ratio"] <= report["ratio_target"] for c in report["checks"])
    for timing in report["timing"]:
        phases = timing["phases"]
        assert set(timing["ms"]) == {"single_forward", "single_step", "ep_forward", "ep_forward_no_overlap",
                                     "ep_step", "ep_step_no_overlap"}  # fmt: skip
        assert phases["all_to_all_ms"] > 0 and phases["compute_ms"] > 0 and phases["bytes_sent_to_other_ranks"] > 0
    markdown = (tmp_path / "expert_parallel_gpu.md").read_text()
    assert "EP forward split" in markdown and "smoke-decode" in markdown
