"""Property-based tests of the grouped matmul (``moeflux.ops.grouped_matmul``) and its
weight-gradient kernel, through Triton's interpreter, against float64 math written here.

Drawn: T from 0, E' up to 35 with empty experts, K and N from 1 (odd, around the 16-wide
blocks), every epilogue combination (gather, SwiGLU, row scale, scatter), float32 / float16 /
bfloat16, inputs contiguous, column-strided, misaligned (odd row stride, pointer off 16 bytes)
or column-major, weights row- or column-major, small or default launch configs. Outputs and
every internal ``torch.empty`` start as NaN: an element left unwritten fails the test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moeflux.ops.dispatch import build_dispatch_plan
from moeflux.ops.grouped_matmul import GroupedMatmulConfig, grouped_matmul
from moeflux.ops.grouped_matmul.weight_grad import ROW_ORDERS, WeightGradConfig, grouped_weight_grad
from tests.properties.support import (
    check_within,
    examples,
    float_dtypes,
    laid_out,
    layouts,
    poisoned_allocations,
    rel_l2,
    widths,
)

# Against float64: the output is rounded once to its dtype (the interpreter truncates to bfloat16).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@st.composite
def problems(draw):
    """A dispatch plan over ``E + S`` experts (routed ids from a subset: the rest empty)."""
    E = draw(st.one_of(st.integers(1, 6), st.just(33)))
    S = draw(st.integers(0, 2))
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(2, 12)))
    k = draw(st.integers(1, min(E, 3)))
    chosen = draw(st.lists(st.integers(0, E - 1), min_size=k, max_size=E, unique=True))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    pool = torch.tensor(chosen)
    if T:
        expert_ids = pool[torch.stack([torch.randperm(len(chosen), generator=generator)[:k] for _ in range(T)])]
    else:
        expert_ids = torch.zeros(0, k, dtype=torch.int64)
    plan = build_dispatch_plan(expert_ids, E, num_shared_experts=S, block_m=draw(st.sampled_from([16, 32, 64])))
    return expert_ids, E, S, plan, generator


def pair_experts(expert_ids: torch.Tensor, E: int, S: int) -> torch.Tensor:
    """``[P]`` expert of each flat pair ``t k' + j`` (shared slots after the routed ones)."""
    shared = torch.arange(E, E + S).expand(expert_ids.shape[0], S)
    return torch.cat([expert_ids, shared], dim=1).reshape(-1)


configs = st.one_of(
    st.none(),
    st.builds(GroupedMatmulConfig, block_m=st.sampled_from([16, 32]), block_n=st.sampled_from([16, 32]),
              block_k=st.sampled_from([16, 32]), group_m=st.sampled_from([1, 2, 8]), num_warps=st.just(4),
              num_stages=st.just(2), weight_tma=st.booleans(), persistent=st.booleans()),
)  # fmt: skip


@examples(60)
@given(problems(), widths, widths, float_dtypes, st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       layouts, st.sampled_from(["row-major", "column-major"]), configs)  # fmt: skip
def test_grouped_matmul_matches_float64(problem, K, N, dtype, gather, swiglu, scale, scatter, x_layout,
                                        weight_layout, config):  # fmt: skip
    expert_ids, E, S, plan, generator = problem
    P, top_k = plan.num_pairs, plan.top_k
    width = 2 * N if swiglu else N
    x = laid_out(torch.randn(plan.num_tokens if gather else P, K, generator=generator).to(dtype), x_layout)
    weight = (torch.randn(E + S, K, width, generator=generator) / math.sqrt(K)).to(dtype)
    if weight_layout == "column-major":
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)
    row_scale = torch.rand(P, generator=generator) if scale else None
    out = torch.full((P, N), math.nan, dtype=dtype)

    with poisoned_allocations():
        result = grouped_matmul(x, weight, plan, gather=gather, swiglu=swiglu, row_scale=row_scale, scatter=scatter,
                                config=config, out=out)  # fmt: skip
    assert result is out
    assert not out.isnan().any(), "rows or columns left unwritten"

    # float64, one sorted row at a time: row r is pair sorted_to_pair[r] of expert e(pair).
    pair_of_row = plan.sorted_to_pair.long()
    experts = pair_experts(expert_ids, E, S)[pair_of_row]
    source = x.double()[pair_of_row // top_k] if gather else x.double()
    acc = torch.einsum("rk,rkn->rn", source, weight.double()[experts]) if P else torch.zeros(0, width).double()
    if swiglu:
        acc = F.silu(acc[:, :N]) * acc[:, N:]
    if scale:
        acc = acc * row_scale.double()[pair_of_row, None]
    expected = torch.empty_like(acc)
    expected[pair_of_row if scatter else torch.arange(P)] = acc
    assert rel_l2(out, expected) < TOLERANCE[dtype]


@examples(40)
@given(problems(), widths, widths, float_dtypes, st.sampled_from(ROW_ORDERS), st.sampled_from(ROW_ORDERS),
       st.booleans(), layouts, st.builds(WeightGradConfig, block_k=st.just(16), block_n=st.sampled_from([16, 32]),
       block_m=st.sampled_from([16, 32]), num_warps=st.just(4), num_stages=st.just(2),
       prefetch_rows=st.booleans(), prescale=st.booleans(), sorted_tma=st.booleans(), out_tma=st.booleans()),
       st.booleans())  # fmt: skip
def test_weight_grad_matches_float64(problem, K, N, dtype, a_rows, b_rows, scale, layout, config, transposed_out):
    """``dW[e] = sum_r s(r) a[src_a(r)]^T b[src_b(r)]``; experts without rows get exact zeros.
    ``out`` may be the transposed view of a ``[E', N, K]`` tensor (a weight's layout)."""
    expert_ids, E, S, plan, generator = problem
    P, T = plan.num_pairs, plan.num_tokens
    a = laid_out(torch.randn(T if a_rows == "tokens" else P, K, generator=generator).to(dtype), layout)
    b = torch.randn(T if b_rows == "tokens" else P, N, generator=generator).to(dtype)
    row_scale = torch.rand(P, generator=generator) if scale else None
    if transposed_out:
        out = torch.full((E + S, N, K), math.nan, dtype=dtype).transpose(1, 2)
    else:
        out = torch.full((E + S, K, N), math.nan, dtype=dtype)

    with poisoned_allocations():
        grouped_weight_grad(a, b, plan, a_rows=a_rows, b_rows=b_rows, row_scale=row_scale, config=config, out=out)
    assert not out.isnan().any(), "gradient elements left unwritten"

    pair_of_row = plan.sorted_to_pair.long()
    experts = pair_experts(expert_ids, E, S)[pair_of_row]
    source = {"sorted": torch.arange(P), "tokens": pair_of_row // plan.top_k, "pairs": pair_of_row}
    left = a.double()[source[a_rows]]
    if scale:
        left = left * row_scale.double()[pair_of_row, None]
    right = b.double()[source[b_rows]]
    expected = torch.zeros(E + S, K, N, dtype=torch.float64)
    expected.index_add_(0, experts, left[:, :, None] * right[:, None, :])
    # Against the sum of the products' magnitudes: a few rows that nearly cancel (K = N = 1,
    # five bfloat16 rows) leave a rounding error far above the result's own norm.
    magnitude = torch.zeros_like(expected).index_add_(0, experts, (left.abs()[:, :, None] * right.abs()[:, None, :]))
    check_within("dW", out, expected, magnitude, TOLERANCE[dtype])
    empty = torch.bincount(experts, minlength=E + S) == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "an expert without rows got a non-zero gradient"
