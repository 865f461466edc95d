"""The grouped weight-gradient kernel against a per-expert torch loop (float64).

Run on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1``. Blocks are forced to 16
so each expert's row loop takes several steps and K, N have ragged tails. Outputs are filled
with NaN before launch: an element the kernel fails to write shows up as NaN. The kernel's
variants (the pair ids prefetched a step ahead or loaded in the step, the row scale applied in
the kernel or by a separate pass) must agree bitwise, and the GPU sweep's tile shapes are run
on problems large enough for several steps, with even and ragged K, N.
"""

from __future__ import annotations

import dataclasses
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
SMALL = WeightGradConfig(block_k=16, block_n=16, block_m=16, num_warps=4, num_stages=2)  # scale by a separate pass
IN_KERNEL = WeightGradConfig(block_k=16, block_n=16, block_m=16, num_warps=4, num_stages=2, prescale=False)
# Sorted operands loaded and dW tiles stored through TMA descriptors (the interpreter runs them).
TMA = dataclasses.replace(SMALL, sorted_tma=True, out_tma=True)
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
# not multiples of 16 (masked tails). Every row order of either operand, with and without scale
# (applied by the separate pass, or in the kernel).
@pytest.mark.parametrize(
    "a_rows, b_rows, scale",
    list(itertools.product(ROW_ORDERS, ROW_ORDERS, [False, "prescale", "in-kernel"])),
    ids=lambda v: "noscale" if v is False else v,
)  # fmt: skip
def test_row_orders_fp32(a_rows, b_rows, scale):
    plan, operands, row_scale = make_problem(13, 2, 5, 1, 40, 24, torch.float32, choices=[0, 1, 2, 4])
    a, b = operands[a_rows][0], operands[b_rows][1]
    row_scale = row_scale if scale else None
    out = run(a, b, plan, a_rows, b_rows, row_scale, IN_KERNEL if scale == "in-kernel" else SMALL)
    expected = reference(a, b, plan, a_rows, b_rows, row_scale)
    assert rel_l2(out, expected) < TOLERANCE[torch.float32]
    assert torch.equal(out[3], torch.zeros_like(out[3])), "an expert with no rows must get exact zeros"


@pytest.mark.parametrize("K, N", [(40, 72), (72, 40), (48, 48)], ids=["N wider", "K wider", "square"])
def test_grid_orientations(K, N):
    # The narrower of K and N varies fastest in the grid; every tile of both orientations,
    # ragged ones included, is written (NaN-poisoned output) with the reference's values.
    plan, operands, row_scale = make_problem(31, 2, 4, 1, K, N, torch.float32, choices=[0, 1, 3], seed=9)
    a, b = operands["tokens"][0], operands["sorted"][1]
    out = run(a, b, plan, "tokens", "sorted", row_scale)
    assert rel_l2(out, reference(a, b, plan, "tokens", "sorted", row_scale)) < TOLERANCE[torch.float32]
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    # The two launches of the experts backward: dW_down (sorted h scaled, gathered dout) and
    # dW_gate_up (gathered x, sorted dpre); float32 accumulation, one rounding at the store.
    plan, operands, row_scale = make_problem(21, 2, 4, 1, 48, 32, dtype, seed=1)
    for a_rows, b_rows, scale in (("sorted", "tokens", row_scale), ("tokens", "sorted", None)):
        a, b = operands[a_rows][0], operands[b_rows][1]
        for config in (SMALL, IN_KERNEL):
            out = run(a, b, plan, a_rows, b_rows, scale, config)
            assert out.dtype == dtype
            assert rel_l2(out, reference(a, b, plan, a_rows, b_rows, scale)) < TOLERANCE[dtype]


def test_tma_falls_back_where_the_layout_does_not_allow_it():
    # Output slices of a wider tensor (a band of a recomputing backward): through a descriptor
    # of the slice when its start and strides are 16-byte aligned (the columns beside it stay
    # untouched), pointer stores otherwise. Operands whose rows are not 16-byte multiples take
    # pointer loads. The same result every way.
    plan, operands, row_scale = make_problem(17, 2, 4, 1, 40, 24, torch.float32, seed=10)
    a, b = operands["sorted"][0], operands["tokens"][1]
    expected = reference(a, b, plan, "sorted", "tokens", row_scale)
    for width, first in ((30, 3), (32, 4)):  # misaligned, then aligned
        wide = torch.full((plan.num_experts, 40, width), float("nan"), device=DEVICE)
        band = wide[:, :, first : first + 24]
        grouped_weight_grad(a, b, plan, b_rows="tokens", row_scale=row_scale, config=TMA, out=band)
        assert rel_l2(band, expected) < TOLERANCE[torch.float32]
        assert wide[:, :, :first].isnan().all() and wide[:, :, first + 24 :].isnan().all()
    odd = torch.randn(a.shape[0], 37, device=DEVICE)  # 148-byte rows
    out = run(odd, b, plan, "sorted", "tokens", row_scale, dataclasses.replace(TMA, prescale=False))
    assert rel_l2(out, reference(odd, b, plan, "sorted", "tokens", row_scale)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("config", [SMALL, TMA], ids=["pointer-store", "tma-store"])
def test_transposed_out_view(config):
    # dW^T written into the transposed view of a [E', N, K] tensor (the experts backward's
    # d_down): the same values, laid out for the weight, every element written.
    plan, operands, row_scale = make_problem(17, 2, 4, 1, 40, 24, torch.float32, choices=[0, 1, 3], seed=11)
    a, b = operands["tokens"][0], operands["sorted"][1]
    weight_layout = torch.full((plan.num_experts, 24, 40), float("nan"), device=DEVICE)
    grouped_weight_grad(a, b, plan, a_rows="tokens", row_scale=row_scale, config=config,
                        out=weight_layout.transpose(1, 2))  # fmt: skip
    expected = reference(a, b, plan, "tokens", "sorted", row_scale)
    assert not weight_layout.isnan().any()
    assert rel_l2(weight_layout.transpose(1, 2), expected) < TOLERANCE[torch.float32]
    assert torch.equal(weight_layout[2], torch.zeros_like(weight_layout[2]))


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


@pytest.mark.parametrize("config", [IN_KERNEL, dataclasses.replace(SMALL, prefetch_rows=False)],
                         ids=["prefetch", "former-prescale"])  # fmt: skip
def test_transposed_operands(config):
    # Row-strided (column-major) views of both operands: a sorted operand's pointers advance by
    # its row stride, 1 here; gathered rows too.
    plan, operands, row_scale = make_problem(19, 2, 4, 1, 40, 24, torch.float32, seed=8)
    for a_rows, b_rows in (("sorted", "tokens"), ("tokens", "sorted")):
        a = operands[a_rows][0].T.contiguous().T
        b = operands[b_rows][1].T.contiguous().T
        assert a.stride(0) == 1 and b.stride(0) == 1
        out = run(a, b, plan, a_rows, b_rows, row_scale, config)
        assert rel_l2(out, reference(a, b, plan, a_rows, b_rows, row_scale)) < TOLERANCE[torch.float32]


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
    # The training shapes get dot-able tiles and pipelines that fit an H100's 227 KiB, for
    # long (and unknown) and short row loops.
    for K, N in [(7168, 4096), (2048, 7168), (2048, 1536), (768, 2048), (24, 40)]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for rows_per_expert in (None, 1241.0, 256.0, 3.0):
                config = select_weight_grad_config(K, N, dtype, rows_per_expert=rows_per_expert)
                assert min(config.block_k, config.block_n, config.block_m) >= 16
                element_size = torch.empty((), dtype=dtype).element_size()
                stage = (config.block_k + config.block_n) * config.block_m * element_size
                assert 2 <= config.num_stages and stage * config.num_stages <= 227 * 1024
                assert config.prefetch_rows and config.prescale


def test_select_config_regimes():
    # 128 x 256 tiles for long row loops (T=8192 on the competition shape), 128 x 128 for short
    # ones (model prefill, ~256 rows an expert) and float32.
    wide = WeightGradConfig(128, 256, 64, 8, 3, sorted_tma=True, out_tma=True)
    assert select_weight_grad_config(7168, 4096, torch.bfloat16, rows_per_expert=1241.0) == wide
    assert select_weight_grad_config(2048, 7168, torch.bfloat16) == wide
    assert select_weight_grad_config(2048, 1536, torch.bfloat16, rows_per_expert=256.0) == WeightGradConfig(
        128, 128, 64, 4, 3
    )
    assert select_weight_grad_config(7168, 4096, torch.float32).block_n == 128


# The GPU sweep's tile shapes (benchmarks/moe_train_gpu.py), the former main loop among them.
SWEEP_LIKE = [
    WeightGradConfig(128, 256, 64, 8, 4),
    WeightGradConfig(128, 256, 32, 8, 5, prescale=False),
    WeightGradConfig(256, 128, 64, 8, 3),
    WeightGradConfig(128, 128, 64, 8, 3),
    WeightGradConfig(128, 128, 32, 4, 5, prescale=False),
    WeightGradConfig(128, 128, 64, 8, 4, prefetch_rows=False, prescale=False),
]


@pytest.mark.parametrize("config", SWEEP_LIKE, ids=lambda c: f"{c.block_k}x{c.block_n}x{c.block_m}"
                         f"{'' if c.prefetch_rows else '-former'}{'-prescale' if c.prescale else ''}")  # fmt: skip
@pytest.mark.parametrize("K, N", [(256, 256), (200, 300)], ids=["even", "ragged"])
def test_sweep_configs(config, K, N):
    # T=150, k=2 of E=3 (expert 1 never chosen) + 1 shared: 150 shared rows and ~150 rows on
    # each used routed expert, several 32- or 64-row steps with a tail; both launches of the
    # experts backward (dW_down: sorted a scaled, gathered b; dW_gate_up: gathered a).
    plan, operands, row_scale = make_problem(150, 2, 3, 1, K, N, torch.float32, choices=[0, 2], seed=5)
    for a_rows, b_rows, scale in (("sorted", "tokens", row_scale), ("tokens", "sorted", None)):
        a, b = operands[a_rows][0], operands[b_rows][1]
        out = run(a, b, plan, a_rows, b_rows, scale, config)
        assert rel_l2(out, reference(a, b, plan, a_rows, b_rows, scale)) < TOLERANCE[torch.float32]
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize(
    "a_rows, b_rows, dtype",
    [(*orders, torch.float32) for orders in itertools.product(ROW_ORDERS, ROW_ORDERS)]
    + [(*orders, torch.bfloat16) for orders in (("sorted", "tokens"), ("tokens", "sorted"), ("pairs", "tokens"))],
    ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v,
)  # fmt: skip
def test_variants_agree_bitwise(a_rows, b_rows, dtype):
    # Pair ids prefetched or loaded in the step, scale in the kernel or by the separate pass
    # (on a when a is not "tokens", else on b): same steps, same products, same bits; scaling
    # b instead rounds the other operand, so that case is held to the reference instead.
    plan, operands, row_scale = make_problem(29, 3, 5, 1, 40, 24, dtype, choices=[0, 1, 3, 4], seed=6)
    a, b = operands[a_rows][0], operands[b_rows][1]
    for scale in (None, row_scale):
        base = run(a, b, plan, a_rows, b_rows, scale, IN_KERNEL)
        former = run(a, b, plan, a_rows, b_rows, scale, dataclasses.replace(IN_KERNEL, prefetch_rows=False))
        assert torch.equal(base, former)
        assert torch.equal(base, run(a, b, plan, a_rows, b_rows, scale, dataclasses.replace(TMA, prescale=False)))
        prescaled = run(a, b, plan, a_rows, b_rows, scale, SMALL)
        assert torch.equal(prescaled, run(a, b, plan, a_rows, b_rows, scale, TMA))
        if scale is None or a_rows != "tokens" or b_rows == "tokens":
            assert torch.equal(base, prescaled)
        else:
            expected = reference(a, b, plan, a_rows, b_rows, scale)
            assert rel_l2(prescaled, expected) < TOLERANCE[dtype]
        assert torch.equal(prescaled[2], torch.zeros_like(prescaled[2]))


@pytest.mark.parametrize("config", [IN_KERNEL, dataclasses.replace(IN_KERNEL, prefetch_rows=False),
                                    WeightGradConfig(32, 16, 64, 4, 3), TMA],
                         ids=["prefetch", "former", "block_m64-prescale", "tma"])  # fmt: skip
@pytest.mark.parametrize("a_rows, b_rows", [("sorted", "sorted"), ("sorted", "tokens"), ("pairs", "sorted")])
def test_poisoned_neighbour_rows(config, a_rows, b_rows):
    # Every operand row read by expert 2 is NaN: its dW is NaN, and the other experts, whose
    # steps end mid-tile next to those rows (or gather them), stay exact.
    plan, operands, row_scale = make_problem(23, 2, 4, 1, 40, 24, torch.float32, seed=7)
    offsets = plan.expert_offsets.tolist()
    rows = torch.arange(offsets[2], offsets[3], device=DEVICE)
    pairs = plan.sorted_to_pair.long()[rows]
    poisoned = {"sorted": rows, "pairs": pairs}
    a, b = operands[a_rows][0].clone(), operands[b_rows][1].clone()
    a[poisoned[a_rows]] = float("nan")
    if b_rows != "tokens":
        b[poisoned[b_rows]] = float("nan")
    out = run_allowing_nan(a, b, plan, a_rows, b_rows, row_scale, config)
    expected = reference(a, b, plan, a_rows, b_rows, row_scale)
    assert out[2].isnan().all()
    others = [0, 1, 3, 4]
    assert not out[others].isnan().any() and rel_l2(out[others], expected[others]) < TOLERANCE[torch.float32]


def run_allowing_nan(a, b, plan, a_rows, b_rows, row_scale, config):
    return grouped_weight_grad(a, b, plan, a_rows=a_rows, b_rows=b_rows, row_scale=row_scale, config=config)


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
