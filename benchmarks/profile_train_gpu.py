"""Profile one training step of the Triton experts (default and ``recompute=True``) at a
shape of ``benchmarks/moe_train_gpu.py``: the CUDA time of each kernel, summed over the step,
from ``torch.profiler``.

    PYTHONPATH=src python3 benchmarks/profile_train_gpu.py --shape mixtral --out $OUT
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from _common import pick_device, report_path
from moe_train_gpu import leaves_of, load_shapes, make_inputs, recompute_experts, step, triton_experts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--shape", default="mixtral")
    args = parser.parse_args()
    picked = pick_device(False)
    if picked is None:
        return 2
    device, gpu = picked
    shape = next(s for s in load_shapes(False)[1] if args.shape in s.name)
    inputs, grad_out = make_inputs(shape, device)
    lines = [f"{shape.name} on {gpu}"]
    for name, experts in (("default", triton_experts), ("recompute", recompute_experts)):
        leaves, expert_ids, E = leaves_of(inputs)
        for _ in range(2):
            step(experts, leaves, expert_ids, E, grad_out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(experts, leaves, expert_ids, E, grad_out)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        lines += ["", f"== {name} ==", table]
        del leaves
    text = "\n".join(lines)
    print(text)
    report_path(args.out, "profile_train_gpu.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
