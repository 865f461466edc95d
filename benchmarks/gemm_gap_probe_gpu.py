"""Probe: where do the grouped GEMMs lose against cuBLAS; do TMA weights and a persistent grid help?

The first run (``benchmarks/results/gemm-gap-probe-h100-2026-11-25-cfa6961/``, that commit's
version of this script) timed variants that each removed one ingredient of the kernel:

* gathering input rows costs nothing measurable: the same GEMM on rows gathered beforehand
  through TMA was 6-11% *slower*;
* one ``[BK, 2BN]`` gate|up weight tile and one dot instead of two dots (the accumulator
  split for SwiGLU afterwards) ran 10-12x slower: Triton 3.6 spills the split;
* a persistent down GEMM with the weights through device-built TMA descriptors and flattened
  loops was 7-10% faster than the library's kernel (and 3.5x slower with pointer loads of the
  weights, which the flattened loop does not pipeline).

Those are now ``GroupedMatmulConfig.weight_tma`` and ``.persistent``. This run times every
grouped GEMM of the forward and the training step with the heuristic's config three ways
(``nested``: neither; ``weight_tma``; ``persistent``: both), in interleaved rounds, beside
cuBLAS on a dense product of the same size:

  ``gate_up``     forward, gathered tokens, SwiGLU epilogue.
  ``down``        forward, sorted rows (TMA), row-scaled, scattered to pair order.
  ``train_pre``   training forward: gathered tokens, no epilogue (pre-activations kept).
  ``train_g``     backward: gathered output gradient times the transposed down weight.
  ``train_dx``    backward: sorted pre-activation gradient times a band of the transposed
                  gate|up weight, scattered to pair order.

    PYTHONPATH=src python3 benchmarks/gemm_gap_probe_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys

import torch

from _common import git_commit, pick_device, rel_l2, report_path, time_ms, write_report
from moe_forward_gpu import load_shapes, make_inputs
from moeflux.ops.dispatch import build_dispatch_plan
from moeflux.ops.experts.autograd import _column_bands
from moeflux.ops.experts.triton import pair_weights
from moeflux.ops.grouped_matmul import grouped_matmul, heuristic_config

ROUNDS = 5


def gemms(shape, x, weights, expert_ids, expert_weights):
    """``{name: (swiglu, N, K, run, dense)}``: ``run(plan, config)`` launches the GEMM into a
    buffer of its own; ``dense()`` is cuBLAS on a dense product of the same size."""
    H, D, S = shape.H, shape.D, shape.S
    plan = build_dispatch_plan(expert_ids, shape.E, num_shared_experts=S, block_m=16, check_ids=False)
    P = plan.num_pairs
    scale = pair_weights(expert_weights, S).view(-1)
    hidden = torch.randn(P, D, device=x.device, dtype=x.dtype)
    pre = torch.empty(P, 2 * D, device=x.device, dtype=x.dtype)
    d_pre = torch.randn(P, 2 * D, device=x.device, dtype=x.dtype)
    g = torch.empty(P, D, device=x.device, dtype=x.dtype)
    d_out = torch.randn(shape.T, H, device=x.device, dtype=x.dtype)
    pair_out = torch.empty(P, H, device=x.device, dtype=x.dtype)
    first, last = _column_bands(H, D)[0]
    band = last - first
    dx_pairs = torch.empty(P, band, device=x.device, dtype=x.dtype)
    down_t, gate_up_t = weights.down.transpose(1, 2), weights.gate_up[:, first:last].transpose(1, 2)
    a_h, a_d, a_2d = (torch.randn(P, n, device=x.device, dtype=x.dtype) for n in (H, D, 2 * D))
    return plan, {
        "gate_up": (True, D, H, lambda p, c: grouped_matmul(x, weights.gate_up, p, gather=True, swiglu=True,
                                                            config=c, out=hidden),
                    lambda: torch.mm(a_h, weights.gate_up[0])),
        "down": (False, H, D, lambda p, c: grouped_matmul(hidden, weights.down, p, row_scale=scale, scatter=True,
                                                          config=c, out=pair_out),
                 lambda: torch.mm(a_d, weights.down[0])),
        "train_pre": (False, 2 * D, H, lambda p, c: grouped_matmul(x, weights.gate_up, p, gather=True, config=c,
                                                                   out=pre),
                      lambda: torch.mm(a_h, weights.gate_up[0])),
        "train_g": (False, D, H, lambda p, c: grouped_matmul(d_out, down_t, p, gather=True, config=c, out=g),
                    lambda: torch.mm(a_h, down_t[0])),
        "train_dx": (False, band, 2 * D, lambda p, c: grouped_matmul(d_pre, gate_up_t, p, scatter=True, config=c,
                                                                     out=dx_pairs),
                     lambda: torch.mm(a_2d, gate_up_t[0])),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--shapes", default="competition,mixtral-8x7b-prefill,qwen3-30b-a3b-prefill,deepseek-v3-slice-prefill")
    parser.add_argument("--gemms", default="gate_up,down,train_pre,train_g,train_dx")
    args = parser.parse_args()
    picked = pick_device(False)
    if picked is None:
        return 2
    device, gpu = picked
    wanted = args.shapes.split(",")
    rows = []
    for shape in load_shapes(False):
        if not any(shape.name.startswith(w) for w in wanted):
            continue
        x, weights, expert_ids, expert_weights = make_inputs(shape, device)
        rows_per_expert = -(-shape.T * (shape.k + shape.S) // (shape.E + shape.S))
        plan, runs = gemms(shape, x, weights, expert_ids, expert_weights)
        for name, (swiglu, N, K, run, dense) in runs.items():
            if name not in args.gemms.split(","):
                continue
            base = heuristic_config(rows_per_expert, N * (2 if swiglu else 1), K, shape.dtype, swiglu=swiglu)
            configs = {"nested": dataclasses.replace(base, weight_tma=False, persistent=False),
                       "weight_tma": dataclasses.replace(base, weight_tma=True, persistent=False),
                       "persistent": dataclasses.replace(base, weight_tma=True, persistent=True)}  # fmt: skip
            tiled = plan.with_block_m(base.block_m)
            reference = run(tiled, configs["nested"]).clone()
            error = max(rel_l2(run(tiled, configs[v]), reference) for v in ("weight_tma", "persistent"))
            flops = 2 * plan.num_pairs * N * K * (2 if swiglu else 1)
            times: dict[str, list[float]] = {"nested": [], "weight_tma": [], "persistent": [], "cublas": []}
            for _ in range(ROUNDS):
                for variant in configs:
                    times[variant].append(time_ms(lambda: run(tiled, configs[variant]), quick=True))
                times["cublas"].append(time_ms(dense, quick=True))
            medians = {v: statistics.median(t) for v, t in times.items()}
            row = {"shape": shape.name, "gemm": name, "config": dataclasses.asdict(base), "median_ms": medians,
                   "all_ms": times, "tflops": {v: flops / m / 1e9 for v, m in medians.items()},
                   "over_nested": {v: medians[v] / medians["nested"] for v in configs},
                   "rel_l2_vs_nested": error}  # fmt: skip
            rows.append(row)
            print(f"{shape.name:32s} {name:10s} " + "  ".join(
                f"{v} {m:.3f} ms ({flops / m / 1e9:.0f})" for v, m in medians.items())
                + f"  err {error:.1e}", flush=True)  # fmt: skip
        del x, weights, runs, plan
        torch.cuda.empty_cache()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"weight-TMA / persistent probe on {gpu}, {date}, commit {git_commit()}: median ms of {ROUNDS} "
             "interleaved rounds (TFLOP/s; time over nested), heuristic config", "",
             "| shape | GEMM | nested | weight_tma | persistent | cuBLAS dense | rel-L2 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        m, t, r = row["median_ms"], row["tflops"], row["over_nested"]
        cells = [f"{m[v]:.3f} ({t[v]:.0f}; {r[v]:.3f})" for v in ("nested", "weight_tma", "persistent")]
        lines.append(f"| {row['shape']} | {row['gemm']} | {' | '.join(cells)} | {m['cublas']:.3f} ({t['cublas']:.0f}) | "
                     f"{row['rel_l2_vs_nested']:.1e} |")  # fmt: skip
    write_report(report_path(args.out, "gemm_gap_probe_gpu.json"), {"gpu": gpu, "date": date,
                 "git_commit": git_commit(), "rows": rows}, "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
