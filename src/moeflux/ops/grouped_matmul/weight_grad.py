"""Grouped weight gradient over a dispatch plan: ``dW[e] = a[rows(e)]^T @ b[rows(e)]``.

The backward of a grouped GEMM ``out[rows(e)] = in[rows(e)] @ W[e]`` needs, per expert, the
product of its input rows and its output-gradient rows, reduced over the rows. Sorted row
``r`` of expert ``e`` (``expert_offsets[e] <= r < expert_offsets[e + 1]``) contributes, in
float32::

    dW[e] += s(r) * a[src_a(r)]^T b[src_b(r)]      (an outer product [K] x [N])

where each operand's rows are read in one of three orders (``a_rows`` / ``b_rows``):

* ``"sorted"``: ``src(r) = r`` (the operand is already in sorted order, ``[P, .]``);
* ``"tokens"``: ``src(r) = sorted_to_pair[r] // k'`` (the forward's gather, ``[T, .]``);
* ``"pairs"``: ``src(r) = sorted_to_pair[r]`` (a scattered output, ``[P, .]`` in pair order);

and ``s(r) = row_scale[sorted_to_pair[r]]`` (float32, pair order) when given, else 1.

Grid: one program per ``[BLOCK_K, BLOCK_N]`` tile of one ``dW[e]``, ``E' x cdiv(K, BK) x
cdiv(N, BN)`` programs, each looping over its expert's rows in ``BLOCK_M`` steps, in row
order: deterministic, no atomics, and an expert with no rows stores exact zeros. The grid is
proportional to ``E'`` and the row loop is sequential per expert: an expert with many rows
(the shared experts see every token) makes its programs long. The experts are walked last to
first so those shared experts, which sit last, start first; splitting the rows of large
experts (split-K over rows) is left for later. Fine for the target shapes, whose ``K x N``
tiles alone fill the GPU many times over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeflux.ops.dispatch import DispatchPlan
from moeflux.ops.grouped_matmul.triton import _dot, _input_precision

ROW_ORDERS = ("sorted", "tokens", "pairs")


@dataclass(frozen=True)
class WeightGradConfig:
    """Launch parameters of the weight-gradient kernel.

    Attributes:
        block_k: rows of the ``dW[e]`` tile (the width of ``a``).
        block_n: columns of the ``dW[e]`` tile (the width of ``b``).
        block_m: sorted rows per step of the reduction loop.
        num_warps: warps per program.
        num_stages: software-pipeline depth of the row loop.
    """

    block_k: int = 128
    block_n: int = 128
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 3


def select_weight_grad_config(K: int, N: int, dtype: torch.dtype) -> WeightGradConfig:
    """``128 x 128`` output tiles (smaller for narrow ``K`` / ``N``), 64-row steps (32 in
    float32, whose tiles are twice the bytes), 8 warps for the full tile, and as many stages
    (2 .. 4) as fit in about 160 KiB of shared memory. A heuristic, not a search."""
    block_k = min(128, max(16, triton.next_power_of_2(K)))
    block_n = min(128, max(16, triton.next_power_of_2(N)))
    element_size = torch.empty((), dtype=dtype).element_size()
    block_m = 32 if element_size >= 4 else 64
    num_warps = 8 if block_k * block_n >= 128 * 128 else 4
    stage_bytes = (block_k + block_n) * block_m * element_size
    num_stages = max(2, min(4, (160 * 1024) // stage_bytes))
    return WeightGradConfig(block_k, block_n, block_m, num_warps, num_stages)


@triton.jit
def _weight_grad_kernel(
    a_ptr,  # [rows_a, K]: sorted rows, tokens or pairs
    b_ptr,  # [rows_b, N]
    out_ptr,  # [E', K, N]
    row_scale_ptr,  # [P] float32, pair order (SCALE)
    sorted_to_pair_ptr,  # [P] int32
    expert_offsets_ptr,  # [E' + 1] int32
    K,
    N,
    num_experts,
    a_divisor,  # src_a(r) = sorted_to_pair[r] // a_divisor when GATHER_A (k' or 1)
    b_divisor,
    stride_a_m,
    stride_a_k,
    stride_b_m,
    stride_b_n,
    stride_out_e,
    stride_out_k,
    stride_out_n,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    # Last expert first: the shared experts (every token, the longest row loops) sit last.
    i_e = (num_experts - 1 - tl.program_id(2)).to(tl.int64)
    row_start = tl.load(expert_offsets_ptr + i_e)
    row_end = tl.load(expert_offsets_ptr + i_e + 1)

    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_k = o_k < K
    m_n = o_n < N
    b_acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m_start in range(row_start, row_end, BLOCK_M):
        o_r = m_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted rows
        m_r = o_r < row_end
        if GATHER_A or GATHER_B or SCALE:
            o_pair = tl.load(sorted_to_pair_ptr + o_r, mask=m_r, other=0)
        if GATHER_A:
            o_a = o_pair // a_divisor
        else:
            o_a = o_r
        if GATHER_B:
            o_b = o_pair // b_divisor
        else:
            o_b = o_r
        # a is read transposed, [BLOCK_K, BLOCK_M]; rows past the expert's end load zeros in
        # both operands (a zero times a NaN of the next expert's row would still be NaN).
        p_a = a_ptr + o_a[None, :].to(tl.int64) * stride_a_m + o_k[:, None] * stride_a_k
        b_a = tl.load(p_a, mask=m_k[:, None] & m_r[None, :], other=0.0)
        if SCALE:
            # Scaling a rather than b: on Hopper the left MMA operand may live in registers,
            # the right one must sit in shared memory as loaded.
            b_scale = tl.load(row_scale_ptr + o_pair, mask=m_r, other=0.0)  # [BLOCK_M]
            b_a = (b_a.to(tl.float32) * b_scale[None, :]).to(a_ptr.dtype.element_ty)
        p_b = b_ptr + o_b[:, None].to(tl.int64) * stride_b_m + o_n[None, :] * stride_b_n
        b_b = tl.load(p_b, mask=m_r[:, None] & m_n[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
        b_acc = _dot(b_a, b_b, b_acc, INPUT_PRECISION, DOT_IN_FP32)

    p_out = out_ptr + i_e * stride_out_e + o_k[:, None].to(tl.int64) * stride_out_k + o_n[None, :] * stride_out_n
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_k[:, None] & m_n[None, :])


def grouped_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    plan: DispatchPlan,
    *,
    a_rows: str = "sorted",
    b_rows: str = "sorted",
    row_scale: torch.Tensor | None = None,
    config: WeightGradConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW[e] = sum_{r in rows(e)} s(r) a[src_a(r)]^T b[src_b(r)]`` for every expert of ``plan``.

    Args:
        a: ``[rows, K]``; ``T`` rows when ``a_rows == "tokens"``, else ``P``. Any strides.
        b: ``[rows, N]``, likewise for ``b_rows``; ``a``'s dtype (float32 / float16 / bfloat16).
        plan: the dispatch plan (only ``expert_offsets`` and ``sorted_to_pair`` are read).
        a_rows, b_rows: ``"sorted"``, ``"tokens"`` or ``"pairs"`` (see the module docstring).
        row_scale: ``[P]`` float32 in pair order, multiplies each row's outer product.
        config: launch parameters; :func:`select_weight_grad_config` when omitted.
        out: optional preallocated ``[E', K, N]`` in ``a``'s dtype; every element is written.

    Returns:
        ``[E', K, N]`` in ``a``'s dtype, accumulated in float32; exact zeros for experts
        with no rows.
    """
    P, top_k, num_experts = plan.num_pairs, plan.top_k, plan.num_experts
    expected_rows = {"sorted": P, "tokens": plan.num_tokens, "pairs": P}
    for name, tensor, rows in (("a", a, a_rows), ("b", b, b_rows)):
        if rows not in ROW_ORDERS:
            raise ValueError(f"{name}_rows must be one of {ROW_ORDERS}, got {rows!r}")
        if tensor.dim() != 2 or tensor.shape[0] != expected_rows[rows]:
            raise ValueError(
                f"{name} must be [{expected_rows[rows]}, .] for {name}_rows={rows!r}, got {list(tensor.shape)}"
            )
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"a and b must share a float32 / float16 / bfloat16 dtype, got {a.dtype} and {b.dtype}")
    if row_scale is not None and (row_scale.shape != (P,) or row_scale.dtype != torch.float32):
        raise ValueError(f"row_scale must be float32 [{P}], got {row_scale.dtype} {list(row_scale.shape)}")
    K, N = a.shape[1], b.shape[1]
    if out is None:
        out = torch.empty(num_experts, K, N, device=a.device, dtype=a.dtype)
    elif out.shape != (num_experts, K, N) or out.dtype != a.dtype:
        raise ValueError(f"out must be {a.dtype} [{num_experts}, {K}, {N}], got {out.dtype} {list(out.shape)}")
    if K == 0 or N == 0:
        return out
    if config is None:
        config = select_weight_grad_config(K, N, a.dtype)
    scale = row_scale is not None
    row_scale = plan.sorted_to_pair if row_scale is None else row_scale.contiguous()  # unused when SCALE is off
    grid = (triton.cdiv(N, config.block_n), triton.cdiv(K, config.block_k), num_experts)
    _weight_grad_kernel[grid](
        a, b, out, row_scale, plan.sorted_to_pair, plan.expert_offsets,
        K, N, num_experts, top_k if a_rows == "tokens" else 1, top_k if b_rows == "tokens" else 1,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GATHER_A=a_rows != "sorted", GATHER_B=b_rows != "sorted", SCALE=scale,
        INPUT_PRECISION=_input_precision(a.dtype), DOT_IN_FP32=a.device.type == "cpu" and a.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
