"""The bench loop's decisions: what it skips, and why it says so."""

import pytest
import torch

from moeflux.bench import suite
from moeflux.bench.calibrate import DevicePeaks
from moeflux.bench.shapes import Shape

SHAPE = Shape("tiny", 32, 16, 4, 1, 2, 1, 8, 0)


def test_a_shape_too_large_for_the_gpu_says_how_much_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    huge = Shape("huge", 7168, 2048, 256, 1, 8, 1, 65536, 0)
    needed = huge.memory_needed(2) / 2**30
    with pytest.raises(suite.ShapeDoesNotFit, match=rf"huge needs about {needed:.1f} GiB .* 2.0 GiB of 80 GiB is free"):
        suite.check_fits(huge, torch.device("cuda"), 2)
    suite.check_fits(SHAPE, torch.device("cuda"), 2)  # a small one fits


def test_the_seed_reference_is_timed_only_where_it_is_quick_unless_asked(monkeypatch):
    slow_device = DevicePeaks("float32", 512, gemm_tflops=1e-9, copy_mib=64, copy_gbps=1.0)
    monkeypatch.setattr(suite, "measure_peaks", lambda device, dtype: slow_device)
    run = dict(shapes=[SHAPE], device=torch.device("cpu"), dtype=torch.float32, system_names=["seed-reference"],
               warmup=0, repeat=2)  # fmt: skip
    (row,) = suite.run_bench(**run).rows
    assert row["status"] == "skipped" and "--with-seed-reference" in row["note"]
    (row,) = suite.run_bench(**run, with_seed_reference=True).rows
    assert row["status"] == "ok"


def test_a_failing_system_becomes_an_error_row(monkeypatch):
    from moeflux.bench import systems

    def broken(self):
        raise RuntimeError("kernel exploded\nstack trace")

    monkeypatch.setattr(systems.EagerLoop, "__call__", broken)
    rows = suite.run_bench([SHAPE], torch.device("cpu"), torch.float32, ["eager-loop", "moeflux-torch"], warmup=0,
                           repeat=2).rows  # fmt: skip
    assert [(row["system"], row["status"]) for row in rows] == [("eager-loop", "error"), ("moeflux-torch", "ok")]
    assert rows[0]["note"] == "RuntimeError: kernel exploded"
