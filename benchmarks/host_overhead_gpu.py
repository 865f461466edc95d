"""Probe: how much of a training step (and of an inference forward) is the host's time to
issue the launches, rather than the GPU's time to run them?

    PYTHONPATH=src python3 benchmarks/host_overhead_gpu.py --out $OUT

Per shape of ``benchmarks/moe_train_gpu.py`` (and the forward of the Qwen3 decode shape):

* ``timed``: the median of ``triton.testing.do_bench`` (what the training benchmark reports);
* ``device``: the same work replayed from a CUDA graph (no host cost);
* ``host``: the host's time to issue one call, measured while the GPU is held busy by a
  ``torch.cuda._sleep`` issued first, so no launch waits on the device;

and ``cProfile``'s top functions (by own time) over the issue of ``--profile-calls`` calls of the
first shape, to say where the host time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from _common import graph_replay, pick_device, report_path, run_info, time_ms, write_report
from moe_train_gpu import leaves_of, load_shapes, make_inputs, step, triton_experts
from moeflux.ops.experts.triton import experts_triton

SLEEP_CYCLES = 2_000_000_000  # about 1 s at the H100's clocks: longer than any issue loop here


def host_ms(fn, calls: int) -> float:
    """Median host milliseconds to issue ``fn``, the GPU kept busy meanwhile."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e3 * sorted(times)[len(times) // 2]


def profile_text(fn, calls: int, top: int = 40) -> str:
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return stream.getvalue()


def measure(name: str, fn, calls: int) -> dict:
    fn()
    torch.cuda.synchronize()
    row = {"name": name, "timed_ms": time_ms(fn), "host_ms": host_ms(fn, calls)}
    try:
        row["device_ms"] = time_ms(graph_replay(fn))
    except Exception as error:  # capture may fail for a path that syncs
        row["device_error"] = f"{type(error).__name__}: {error}"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--only", default=None, help="shapes whose name contains this text")
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--profile-calls", type=int, default=20)
    args = parser.parse_args()
    picked = pick_device(False)
    if picked is None:
        return 2
    device, gpu = picked
    shapes = [s for s in load_shapes(False)[1] if args.only is None or args.only in s.name]
    shapes.sort(key=lambda s: not s.name.startswith("qwen3"))  # the host-bound one first
    rows, profiles = [], []
    for shape in shapes:
        inputs, grad_out = make_inputs(shape, device)
        leaves, expert_ids, E = leaves_of(inputs)
        x, weights, gate_up, down = (leaf.detach() for leaf in leaves)

        def train():
            return step(triton_experts, leaves, expert_ids, E, grad_out)

        def forward():
            return experts_triton(x, expert_ids, weights, gate_up, down, E, check_ids=False)

        for kind, fn in (("train", train), ("forward", forward)):
            row = measure(f"{shape.name} {kind}", fn, args.calls)
            rows.append(row)
            print(row, flush=True)
            if not profiles:
                profiles.append(f"== {row['name']}\n" + profile_text(fn, args.profile_calls))
        del inputs, grad_out, leaves
        torch.cuda.empty_cache()

    info = run_info(gpu)
    lines = [
        f"host time to issue a call vs device time, {gpu}, {info['date']}, commit {info['git_commit']}",
        "",
        "| call | timed ms (do_bench) | device ms (graph replay) | host ms (issue) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        device_ms = row.get("device_ms", float("nan"))
        lines.append(f"| {row['name']} | {row['timed_ms']:.3f} | {device_ms:.3f} | {row['host_ms']:.3f} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    path = report_path(args.out, "host_overhead_gpu.json")
    write_report(path, {**info, "rows": rows}, markdown)
    path.with_name("host_overhead_profile.txt").write_text("\n".join(profiles))
    print("\n".join(profiles)[:20000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
