"""``moeflux check`` and ``moeflux bench`` on the CPU default preset."""

import json

from moeflux.cli import main


def test_check_passes_and_writes_results(tmp_path, capsys):
    assert main(["check", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "check-cpu-small.json").read_text())
    assert report["rows"] and all(row["passed"] for row in report["rows"])
    assert "| shape |" in capsys.readouterr().out


def test_bench_times_every_system(tmp_path):
    assert main(["bench", "--warmup", "1", "--repeat", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench-cpu-small.json").read_text())
    systems = {row["system"] for row in report["rows"]}
    assert systems == {"seed-reference", "moeflux-torch"}
    assert all(row["median_ms"] > 0 for row in report["rows"])
    assert (tmp_path / "bench-cpu-small.md").read_text().startswith("moeflux bench on CPU")
