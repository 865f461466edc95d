"""``benchmarks/transformers_gpu.py --smoke`` on the CPU, so the GPU script cannot rot: every
architecture's check passes and every timing row has all eight timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from moeflux.integrations.transformers import ARCHITECTURES

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "transformers_gpu.py"


def test_smoke_run_writes_a_passing_report(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports benchmarks/_common.py
    spec = importlib.util.spec_from_file_location("transformers_gpu", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up
    spec.loader.exec_module(script)

    assert script.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "transformers_gpu.json").read_text())
    assert report["smoke"] and report["checks_ok"]
    assert [check["model_type"] for check in report["checks"]] == list(ARCHITECTURES)
    for check in report["checks"]:
        assert check["ok"] and check["float32"]["tokens_identical"], check
    assert {row["model_type"] for row in report["timing"]} == set(ARCHITECTURES)
    for row in report["timing"]:
        assert not row.get("errors"), row
        for system in ("moeflux", "grouped_mm", "eager", "moeflux_row_major"):
            for mode in ("forward", "train"):
                assert row[f"{system}_{mode}_ms"] > 0, (row["shape"], system, mode)
    assert (tmp_path / "transformers_gpu.md").read_text().startswith("moeflux transformers drop-in")
