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




def host_parts() -> None:
    """Host time of the steps of a harness-style call (CUDA graph path), without a profiler."""
    from moeflux.config import MoEConfig
    from moeflux.expert_tables import ExpertTables

    for shape in competition_shapes("tests")[:1] + competition_shapes("benchmarks")[:1]:
        parts: dict[str, list[float]] = {"tables": [], "call": [], "call_then_sync": [], "sync_only": []}
        for call in range(8):
            data = gpumode.generate_input(**{**shape.seed_args(), "seed": shape.seed + call}, device="cuda")
            x, weights, config = data
            torch.cuda.synchronize()
            begin = time.perf_counter_ns()
            ExpertTables.from_seed_weights(weights, MoEConfig.from_seed_config(config), dtype=x.dtype, device=x.device)
            parts["tables"].append((time.perf_counter_ns() - begin) / 1e6)
            torch.cuda.synchronize()
            begin = time.perf_counter_ns()
            gpumode.custom_kernel(data)
            parts["call"].append((time.perf_counter_ns() - begin) / 1e6)
            torch.cuda.synchronize()
            parts["call_then_sync"].append((time.perf_counter_ns() - begin) / 1e6)
            begin = time.perf_counter_ns()
            torch.cuda.synchronize()
            parts["sync_only"].append((time.perf_counter_ns() - begin) / 1e6)
            del data, x, weights
        print(shape.name, {k: round(statistics.median(v[2:]), 3) for k, v in parts.items()})


def profile_calls(out_dir: str) -> None:
    """Chrome traces of harness-style ``custom_kernel`` calls (fresh input before each), to
    see where the time between the call's start and its first GEMM goes."""
    from torch.profiler import ProfilerActivity, profile

    for shape in competition_shapes("tests")[:1] + competition_shapes("benchmarks")[:1]:
        for call in range(4):
            data = gpumode.generate_input(**{**shape.seed_args(), "seed": shape.seed + call}, device="cuda")
            torch.cuda.synchronize()
            if call < 3:
                gpumode.custom_kernel(data)
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
                torch.cuda.synchronize()
                gpumode.custom_kernel(data)
                torch.cuda.synchronize()
            trace.export_chrome_trace(f"{out_dir}/harness_{shape.name}.json")
            del data
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import sys

    host_parts()
    if len(sys.argv) > 1:
        profile_calls(sys.argv[1])
