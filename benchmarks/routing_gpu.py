"""The routing variants on the GPU: the Triton kernel against the torch path, then timed.

For each rule of :class:`moeflux.RouterConfig` that a public model uses (the seed default,
Mixtral/Qwen3 renormalisation, gpt-oss softmax after top-k, DeepSeek-V3 sigmoid scores with
a correction bias, group-limited top-k and scaling, a capacity factor), on bf16 logits of
model-sized routers: the Triton and torch paths must choose the same experts (tokens whose
sets differ are counted; a differing token must be a tie in the rounded scores), give the
same weights, loads, dropped counts and gradient to the logits. Then both are timed
(forward, and forward + backward).

    PYTHONPATH=src python3 benchmarks/routing_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from _common import git_commit, pick_device, rel_l2, report_path, time_ms, write_report
from moeflux import RouterConfig
from moeflux.ops.routing import route

RULES = {
    "seed (softmax, no renorm)": RouterConfig(),
    "mixtral/qwen3 (renormalise)": RouterConfig(normalize_topk=True),
    "gpt-oss (softmax after top-k)": RouterConfig(softmax_after_topk=True),
    "deepseek-v3 (sigmoid, bias, 8 groups keep 4, x2.5)": RouterConfig(
        scoring="sigmoid", expert_bias=True, num_groups=8, topk_groups=4, normalize_topk=True, scaling_factor=2.5
    ),
    "capacity factor 1.0": RouterConfig(capacity_factor=1.0),
}
# (tokens, experts, top_k): Qwen3-30B-A3B and DeepSeek-V3 routers at a prefill, and a decode.
SHAPES = [(4096, 128, 8), (4096, 256, 8), (32, 256, 8)]


def check_and_time(rule: str, router: RouterConfig, T: int, E: int, k: int, device, smoke: bool) -> dict:
    generator = torch.Generator(device=device).manual_seed(T + E)
    logits = torch.randn(T, E, device=device, generator=generator).to(torch.bfloat16)
    bias = 0.1 * torch.randn(E, device=device, generator=generator) if router.expert_bias else None
    grad = torch.randn(T, k, device=device, generator=generator)
    runs = {}
    for backend in ("triton", "torch"):
        leaf = logits.detach().clone().requires_grad_()
        routing = route(leaf, k, router=router, expert_bias=bias, backend=backend)
        (routing.expert_weights * grad).sum().backward()
        runs[backend] = (routing, leaf.grad)
    (mine, d_mine), (theirs, d_theirs) = runs["triton"], runs["torch"]
    same_sets = (mine.expert_ids.sort(1).values == theirs.expert_ids.sort(1).values).all(1)
    row = {
        "rule": rule, "T": T, "E": E, "k": k,
        "tokens_with_other_experts": int((~same_sets).sum()),
        "weights_rel_l2": rel_l2(mine.expert_weights[same_sets], theirs.expert_weights[same_sets]),
        "loads_equal": bool(torch.equal(mine.tokens_per_expert, theirs.tokens_per_expert)),
        "dropped_equal": bool(torch.equal(mine.dropped_per_expert, theirs.dropped_per_expert)),
        "grad_rel_l2": rel_l2(d_mine, d_theirs),
    }  # fmt: skip
    row["ok"] = bool(
        row["tokens_with_other_experts"] == 0 and row["weights_rel_l2"] < 1e-5 and row["loads_equal"]
        and row["dropped_equal"] and row["grad_rel_l2"] < 1e-5
    )  # fmt: skip
    for backend in ("triton", "torch"):
        row[f"{backend}_fwd_ms"] = time_ms(lambda: route(logits, k, router=router, expert_bias=bias, backend=backend),
                                           quick=True)  # fmt: skip

        def step():
            leaf = logits.detach().requires_grad_()
            (route(leaf, k, router=router, expert_bias=bias, backend=backend).expert_weights * grad).sum().backward()

        row[f"{backend}_fwd_bwd_ms"] = time_ms(step, quick=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    picked = pick_device(args.smoke)
    if picked is None:
        return 1
    device, name = picked
    shapes = [(16, 16, 4)] if args.smoke else SHAPES
    rows = []
    for rule, router in RULES.items():
        for T, E, k in shapes:
            row = check_and_time(rule, router, T, E, k, device, args.smoke)
            rows.append(row)
            print(row, flush=True)
    ok = all(r["ok"] for r in rows)
    lines = [
        f"Routing variants on {name}, bf16 logits (commit {git_commit()}, {time.strftime('%Y-%m-%d')}): "
        f"{'all checks pass' if ok else 'FAILURES'}", "",
        "| rule | T | E | k | tokens with other experts | weights rel-L2 | loads / dropped equal | grad rel-L2 "
        "| triton fwd ms | torch fwd ms | triton fwd+bwd ms | torch fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['T']} | {r['E']} | {r['k']} | {r['tokens_with_other_experts']} | "
            f"{r['weights_rel_l2']:.1e} | {r['loads_equal']} / {r['dropped_equal']} | {r['grad_rel_l2']:.1e} | "
            f"{r['triton_fwd_ms']:.3f} | {r['torch_fwd_ms']:.3f} | {r['triton_fwd_bwd_ms']:.3f} | "
            f"{r['torch_fwd_bwd_ms']:.3f} |"
        )
    report = {"device": name, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "checks_ok": ok, "rows": rows}
    write_report(report_path(args.out, "routing_gpu.json"), report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
