"""Why the competition's harness timing (a fresh ``generate_input`` before every call) runs
slower than the same call timed back to back: counts device allocations (``cudaMalloc``)
and allocation retries inside each timed call, and times the call with and without a
fresh input, for moeflux's ``custom_kernel`` and the seed ``ref_kernel``.

    PYTHONPATH=src python3 benchmarks/harness_probe_gpu.py
"""

from __future__ import annotations

import statistics
import time

import torch

from moeflux import gpumode
from moeflux.bench.shapes import competition_shapes


def timed(kernel, data) -> tuple[float, int, int]:
    before = torch.cuda.memory_stats()
    torch.cuda.synchronize()
    begin = time.perf_counter_ns()
    kernel(data)
    torch.cuda.synchronize()
    elapsed = (time.perf_counter_ns() - begin) / 1e6
    after = torch.cuda.memory_stats()
    mallocs = after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0)
    retries = after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0)
    return elapsed, mallocs, retries


def main() -> None:
    for shape in competition_shapes("benchmarks"):
        for name, kernel in (("custom_kernel", gpumode.custom_kernel), ("ref_kernel", gpumode.ref_kernel)):
            fresh, same = [], []
            mallocs = retries = 0
            data = gpumode.generate_input(**shape.seed_args(), device="cuda")
            for call in range(10):
                data = None
                data = gpumode.generate_input(**{**shape.seed_args(), "seed": shape.seed + call}, device="cuda")
                ms, m, r = timed(kernel, data)
                if call >= 2:
                    fresh.append(ms)
                    mallocs, retries = mallocs + m, retries + r
            for _ in range(8):
                same.append(timed(kernel, data)[0])
            print(
                f"{shape.name:24s} {name:14s} fresh input {statistics.median(fresh):7.3f} ms "
                f"(cudaMalloc {mallocs / 8:.1f}/call, retries {retries / 8:.1f}/call) | same input "
                f"{statistics.median(same):7.3f} ms"
            )
            del data
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
