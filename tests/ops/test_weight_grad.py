"""The grouped weight-gradient kernel against a per-expert torch loop (float64).

Run on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1``. Blocks are forced to 16
so each expert's row loop takes several steps and K, N have ragged tails. Outputs are filled
with NaN before launch: an element the kernel fails to write shows up as NaN.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from moeflux.ops.dispatch import build_dispatch_plan
from moeflux.ops.grouped_matmul.weight_grad import (
    ROW_ORDERS,
    WeightGradConfig,
    grouped_weight_grad,
    select_weight_grad_config,
)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
SMALL = WeightGradConfig(block_k=16, block_n=16, block_m=16, num_warps=4, num_stages=2)
# Against float64; half precision rounds a scaled operand to its dtype before the MMA.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def reference(a, b, plan, a_rows, b_rows, row_scale):
    """``dW[e] = sum_r s(r) a[src_a(r)]^T b[src_b(r)]`` in float64, one expert at a time."""
    offsets = plan.expert_offsets.tolist()
    sorted_to_pair = plan.sorted_to_pair.long()
    out = torch.zeros(plan.num_experts, a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for e in range(plan.num_experts):
        rows = torch.arange(offsets[e], offsets[e + 1], device=a.device)
        pairs = sorted_to_pair[rows]
        source = {"sorted": rows, "tokens": pairs // plan.top_k, "pairs": pairs}
        left = a[source[a_rows]].double()
        if row_scale is not None:
            left = left * row_scale[pairs].double()[:, None]
        out[e] = left.T @ b[source[b_rows]].double()
    return out


def make_problem(T, k, E, S, K, N, dtype, *, choices=None, seed=0):
    """A plan over ``E + S`` experts whose routed picks come from ``choices`` (others empty),
    and operands of every row order."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(choices if choices is not None else list(range(E)))
    expert_ids = pool[torch.stack([torch.randperm(len(pool), generator=generator)[:k] for _ in range(T)])]
    plan = build_dispatch_plan(expert_ids.to(DEVICE), E, num_shared_experts=S, block_m=16)
    P = plan.num_pairs
    operands = {
        rows: (torch.randn(T if rows == "tokens" else P, K, generator=generator).to(DEVICE, dtype),
               torch.randn(T if rows == "tokens" else P, N, generator=generator).to(DEVICE, dtype))
        for rows in ROW_ORDERS
    }  # fmt: skip
    row_scale = torch.rand(P, generator=generator).to(DEVICE)
    return plan, operands, row_scale


def run(a, b, plan, a_rows, b_rows, row_scale, config=SMALL):
    out = torch.full((plan.num_experts, a.shape[1], b.shape[1]), float("nan"), device=a.device, dtype=a.dtype)
    result = grouped_weight_grad(a, b, plan, a_rows=a_rows, b_rows=b_rows, row_scale=row_scale, config=config, out=out)
    assert result is out
    assert not out.isnan().any(), "the kernel left output elements unwritten"
    return out


# T=13 tokens, k=2 of E=5 with expert 3 never chosen, S=1 shared -> P=39 rows over 6 experts:
# the shared expert's 13 rows and the routed experts' few rows end mid-step; K=40 and N=24 are
# not multiples of 16 (masked tails). Every row order of either operand, with and without scale.
@pytest.mark.parametrize(
    "a_rows, b_rows, scale", list(itertools.product(ROW_ORDERS, ROW_ORDERS, [False, True])),
    ids=lambda v: {True: "scale", False: "noscale"}.get(v, v) if isinstance(v, bool) else v,
)  # fmt: skip
def test_row_orders_fp32(a_rows, b_rows, scale):
    plan, operands, row_scale = make_problem(13, 2, 5, 1, 40, 24, torch.float32, choices=[0, 1, 2, 4])
    a, b = operands[a_rows][0], operands[b_rows][1]
    row_scale = row_scale if scale else None
    out = run(a, b, plan, a_rows, b_rows, row_scale)
    expected = reference(a, b, plan, a_rows, b_rows, row_scale)
    assert rel_l2(out, expected) < TOLERANCE[torch.float32]
    assert torch.equal(out[3], torch.zeros_like(out[3])), "an expert with no rows must get exact zeros"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    # The two launches of the experts backward: dW_down (sorted h scaled, gathered dout) and
    # dW_gate_up (gathered x, sorted dpre); float32 accumulation, one rounding at the store.
    plan, operands, row_scale = make_problem(21, 2, 4, 1, 48, 32, dtype, seed=1)
    for a_rows, b_rows, scale in (("sorted", "tokens", row_scale), ("tokens", "sorted", None)):
        a, b = operands[a_rows][0], operands[b_rows][1]
        out = run(a, b, plan, a_rows, b_rows, scale)
        assert out.dtype == dtype and rel_l2(out, reference(a, b, plan, a_rows, b_rows, scale)) < TOLERANCE[dtype]


def test_one_expert_takes_all_and_other_blocks():
    # 40 rows on expert 1 of 3 (experts 0 and 2 empty): a 3-step row loop with a tail; a
    # 32 x 16 tile with block_m=32; a and b column slices of wider tensors (row strides != width).
    generator = torch.Generator().manual_seed(2)
    plan = build_dispatch_plan(torch.ones(40, 1, dtype=torch.int64, device=DEVICE), 3, block_m=16)
    wide_a = torch.randn(40, 50, generator=generator).to(DEVICE)
    wide_b = torch.randn(40, 30, generator=generator).to(DEVICE)
    a, b = wide_a[:, 5:45], wide_b[:, 3:27]
    config = WeightGradConfig(block_k=32, block_n=16, block_m=32, num_warps=4, num_stages=2)
    out = run(a, b, plan, "tokens", "pairs", None, config)
    assert rel_l2(out, reference(a, b, plan, "tokens", "pairs", None)) < TOLERANCE[torch.float32]
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))


def test_no_rows_gives_zeros():
    # T = 0: no expert has rows; every program still stores its (zero) tile.
    plan = build_dispatch_plan(torch.zeros(0, 2, dtype=torch.int64, device=DEVICE), 4, num_shared_experts=1)
    a, b = torch.zeros(0, 24, device=DEVICE), torch.zeros(0, 20, device=DEVICE)
    out = run(a, b, plan, "tokens", "sorted", None)
    assert out.shape == (5, 24, 20) and torch.equal(out, torch.zeros_like(out))


def test_default_config():
    # select_weight_grad_config's own choice, clipped to the tiny K and N.
    plan, operands, _ = make_problem(13, 2, 4, 0, 40, 24, torch.float16, seed=3)
    a, b = operands["tokens"][0], operands["sorted"][1]
    out = grouped_weight_grad(a, b, plan, a_rows="tokens")
    assert rel_l2(out, reference(a, b, plan, "tokens", "sorted", None)) < TOLERANCE[torch.float16]


def test_select_config_shapes():
    # The training shapes get dot-able tiles and pipelines that fit an H100's 227 KiB.
    for K, N in [(7168, 4096), (2048, 7168), (2048, 1536), (768, 2048), (24, 40)]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            config = select_weight_grad_config(K, N, dtype)
            assert min(config.block_k, config.block_n, config.block_m) >= 16
            element_size = torch.empty((), dtype=dtype).element_size()
            stage = (config.block_k + config.block_n) * config.block_m * element_size
            assert 2 <= config.num_stages and stage * config.num_stages <= 227 * 1024


def test_rejects_mismatched_arguments():
    plan, operands, _ = make_problem(5, 2, 3, 0, 16, 16, torch.float32)
    tokens, sorted_rows = operands["tokens"][0], operands["sorted"][1]
    with pytest.raises(ValueError):
        grouped_weight_grad(tokens, sorted_rows, plan)  # "sorted" a needs P rows, not T
    with pytest.raises(ValueError):
        grouped_weight_grad(tokens, sorted_rows, plan, a_rows="token")
    with pytest.raises(TypeError):
        grouped_weight_grad(tokens, sorted_rows.half(), plan, a_rows="tokens")
    with pytest.raises(ValueError):
        grouped_weight_grad(tokens, sorted_rows, plan, a_rows="tokens", row_scale=torch.ones(3, device=DEVICE))
