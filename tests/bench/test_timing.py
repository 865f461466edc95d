"""Percentiles, spread and the device ceilings."""

import pytest
import torch

from moeflux.bench.calibrate import DevicePeaks, measure_peaks
from moeflux.bench.timing import percentile, summarize


def test_summarize_percentiles_and_spread():
    stats = summarize([float(v) for v in range(1, 102)])  # 1 .. 101
    assert stats["median_ms"] == 51
    assert stats["p5_ms"] == pytest.approx(6)
    assert stats["p95_ms"] == pytest.approx(96)
    assert stats["p99_ms"] == pytest.approx(100)
    assert stats["mean_ms"] == pytest.approx(51)
    assert stats["cv"] == pytest.approx(29.3002 / 51, rel=1e-4)  # sample stdev of 1..101 over the mean
    assert stats["repeats"] == 101
    assert summarize([2.0, 2.0])["cv"] == 0


def test_percentile_interpolates():
    assert percentile([0.0, 10.0], 0.25) == pytest.approx(2.5)
    assert percentile([3.0], 0.99) == 3.0


def test_roofline_floor_is_the_slower_ceiling():
    peaks = DevicePeaks("float16", 8192, gemm_tflops=500.0, copy_mib=1024, copy_gbps=2000.0)
    assert peaks.floor_ms(flops=1e12, bytes_moved=1e9) == pytest.approx(2.0)  # 1 TFLOP at 500 TFLOP/s
    assert peaks.floor_ms(flops=1e9, bytes_moved=4e9) == pytest.approx(2.0)  # 4 GB at 2000 GB/s


def test_peaks_are_measured_once_per_device_and_dtype():
    first = measure_peaks(torch.device("cpu"), torch.float32)
    assert first.gemm_tflops > 0 and first.copy_gbps > 0
    assert measure_peaks(torch.device("cpu"), torch.float32) is first
