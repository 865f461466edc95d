"""benchmarks/gemm_table.py: which swept configs enter a GPU's committed table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gemm_table.py"
spec = importlib.util.spec_from_file_location("gemm_table", SCRIPT)
gemm_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gemm_table)


def sweep_run(timings: dict[str, dict[tuple, float]], heuristic_ms: dict[str, float]) -> dict:
    """A run whose sweep timed ``timings[key][config]`` ms against ``heuristic_ms[key]``."""
    sweeps = []
    for key, by_config in timings.items():
        candidates = [{"config": dict(zip("abcdef", config)), "ms": ms} for config, ms in by_config.items()]
        found = {"key": key, "heuristic_ms": heuristic_ms[key], "candidates": candidates}
        sweeps.append({"shape": f"shape of {key}", "gate_up": found, "down": None})
    return {"sweeps": sweeps}


def test_a_config_enters_only_if_it_wins_in_every_run():
    steady, lucky, worse = (128, 256, 64, 16, 8, 3), (128, 128, 32, 8, 8, 4), (64, 64, 64, 8, 4, 4)
    heuristic = {"k1": 1.0, "k2": 1.0, "k3": 1.0}
    run1 = sweep_run({"k1": {steady: 0.95, lucky: 0.90}, "k2": {lucky: 0.90}, "k3": {worse: 1.2}}, heuristic)
    run2 = sweep_run({"k1": {steady: 0.96, lucky: 0.99}, "k2": {lucky: 0.995}, "k3": {worse: 1.1}}, heuristic)
    entries = gemm_table.table_entries([run1, run2], margin=0.03)
    # k1: the steady 4-5% win is kept over a config that won big once; k2: a one-run win is
    # noise; k3: nothing beats the heuristic.
    assert list(entries) == ["k1"]
    assert entries["k1"]["config"] == list(steady) and entries["k1"]["ratios"] == [0.95, 0.96]
    # A config timed in one run only is not compared.
    run3 = sweep_run({"k1": {lucky: 0.5}}, heuristic)
    assert gemm_table.table_entries([run1, run3], margin=0.03)["k1"]["config"] == list(lucky)
    assert gemm_table.table_entries([run1, run2], margin=0.06) == {}


def test_table_formatting_round_trips():
    table = json.loads((SCRIPT.parent.parent / "src" / "moeflux" / "data" / "gemm_configs.json").read_text())
    table["gpus"]["H200"] = {"source": "x", "entries": {"k": {"config": [16, 16, 16, 8, 4, 3], "ratios": [0.9]}}}
    assert json.loads(gemm_table.format_table(table)) == table
