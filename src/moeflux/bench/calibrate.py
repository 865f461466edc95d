"""This device's ceilings, measured in the same run: dense-GEMM throughput and copy bandwidth.

"% of peak" in a result is relative to these two numbers, not to a datasheet: a GPU runs
below its datasheet clocks under load, and the numbers that matter are what this process
on this device can reach. Each measurement takes well under a second and is cached per
(device, dtype) for the life of the process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moeflux.bench.timing import summarize, time_ms


@dataclass(frozen=True)
class DevicePeaks:
    """Attributes:
    gemm_tflops: median TFLOP/s of one square ``torch.mm`` of side ``gemm_size`` in ``dtype``
        (cuBLAS on a GPU): the dense-GEMM peak that "% of peak" divides by.
    copy_gbps: median GB/s (1e9 bytes/s) of a device-to-device ``copy_`` of ``copy_mib``
        MiB, counting the bytes read plus the bytes written: the memory ceiling.
    """

    dtype: str
    gemm_size: int
    gemm_tflops: float
    copy_mib: int
    copy_gbps: float

    def as_dict(self) -> dict:
        return asdict(self)

    def floor_ms(self, flops: float, bytes_moved: float) -> float:
        """The roofline floor: no call can beat both the GEMM peak and the copy bandwidth."""
        return max(flops / (self.gemm_tflops * 1e9), bytes_moved / (self.copy_gbps * 1e6))


_CACHE: dict[tuple[str, torch.dtype], DevicePeaks] = {}


def measure_peaks(device: torch.device, dtype: torch.dtype) -> DevicePeaks:
    """The GEMM peak in ``dtype`` and the copy bandwidth of ``device`` (cached per process)."""
    key = (str(device), dtype)
    if key not in _CACHE:
        _CACHE[key] = _measure(device, dtype)
    return _CACHE[key]


def _measure(device: torch.device, dtype: torch.dtype) -> DevicePeaks:
    on_gpu = device.type == "cuda"
    # Large enough to reach the plateau, small enough to stay quick: 8192^3 is 1.1 TFLOP
    # (~1.5 ms on an H100); a CPU reaches its plateau far sooner.
    size = 8192 if on_gpu else 512
    copy_mib = 1024 if on_gpu else 64
    gemm_dtype = dtype if on_gpu or dtype == torch.float32 else torch.float32  # CPU half GEMMs are emulated
    a = torch.randn(size, size, device=device, dtype=gemm_dtype)
    b = torch.randn(size, size, device=device, dtype=gemm_dtype)
    gemm_ms = summarize(time_ms(lambda: torch.mm(a, b), device, warmup=3, repeat=10))["median_ms"]
    del a, b
    source = torch.empty(copy_mib * 2**20, device=device, dtype=torch.uint8)
    target = torch.empty_like(source)
    copy_ms = summarize(time_ms(lambda: target.copy_(source), device, warmup=3, repeat=10))["median_ms"]
    del source, target
    return DevicePeaks(
        dtype=str(gemm_dtype).removeprefix("torch."),
        gemm_size=size,
        gemm_tflops=2 * size**3 / gemm_ms / 1e9,
        copy_mib=copy_mib,
        copy_gbps=2 * copy_mib * 2**20 / copy_ms / 1e6,
    )
