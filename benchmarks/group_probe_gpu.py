"""Probe: how many row tiles should share a column sweep (``group_m``) in the grouped GEMMs?

A swizzle group of ``group_m`` consecutive row tiles sweeps every column tile together, so a
column block of ``W[e]`` is read from HBM once per group. Experts own a ragged number of row
tiles (Mixtral: about 8-9), so a group of 8 often straddles two experts and an expert's
weights are read by two groups. Larger groups straddle less often but keep more input rows
in L2. This times the forward's two GEMMs at the prefill shapes under ``group_m`` 4 .. 64,
the candidates interleaved over several rounds (timing on a lent GPU drifts by a few percent
between calls), and prints each one's median over rounds relative to ``group_m = 8``.

    PYTHONPATH=src python3 benchmarks/group_probe_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys

import torch

from _common import git_commit, pick_device, report_path, time_ms, write_report
from moe_forward_gpu import forward_gemms, load_shapes, make_inputs
from moeflux.ops.grouped_matmul import heuristic_config

GROUPS = (4, 8, 16, 32, 64)
ROUNDS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    picked = pick_device(False)
    if picked is None:
        return 2
    device, gpu = picked
    rows = []
    for shape in load_shapes(False):
        if shape.T < 1024:  # decode: one or two row tiles an expert, nothing to group
            continue
        x, weights, expert_ids, expert_weights = make_inputs(shape, device)
        rows_per_expert = -(-shape.T * (shape.k + shape.S) // (shape.E + shape.S))
        plan, gemms = forward_gemms(shape, x, weights, expert_ids, expert_weights)
        for gemm, (swiglu, N, K, _, run) in gemms.items():
            base = heuristic_config(rows_per_expert, N, K, shape.dtype, swiglu=swiglu)
            tiled = plan.with_block_m(base.block_m)
            times: dict[int, list[float]] = {g: [] for g in GROUPS}
            for _ in range(ROUNDS):
                for group in GROUPS:
                    config = dataclasses.replace(base, group_m=group)
                    times[group].append(time_ms(lambda: run(tiled, config), quick=True))
            medians = {g: statistics.median(t) for g, t in times.items()}
            row = {"shape": shape.name, "gemm": gemm, "config": dataclasses.asdict(base), "median_ms": medians,
                   "all_ms": times, "relative_to_8": {g: m / medians[8] for g, m in medians.items()}}  # fmt: skip
            rows.append(row)
            print(f"{shape.name:32s} {gemm:8s} " + "  ".join(
                f"g{g}: {m:.3f} ({m / medians[8]:.3f})" for g, m in medians.items()), flush=True)  # fmt: skip
        del x, weights, gemms
        torch.cuda.empty_cache()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"group_m probe on {gpu}, {date}, commit {git_commit()}: median ms over {ROUNDS} interleaved rounds "
             "(ratio to group_m = 8)", "", "| shape | GEMM | " + " | ".join(f"group {g}" for g in GROUPS) + " |",
             "|---|---|" + "---|" * len(GROUPS)]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{row['median_ms'][g]:.3f} ({row['relative_to_8'][g]:.3f})" for g in GROUPS)
        lines.append(f"| {row['shape']} | {row['gemm']} | {cells} |")
    write_report(report_path(args.out, "group_probe_gpu.json"), {"gpu": gpu, "date": date,
                 "git_commit": git_commit(), "rows": rows}, "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
