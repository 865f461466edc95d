"""Autograd of the Triton experts path, and of the plain grouped matmul.

Forward (``P = T k'`` pairs, ``k' = k + S``; sorted order = the plan's, pair order = ``t k' + j``)::

    pre   = x[token(r)] @ W_gate_up[e]                 [P, 2D] sorted   (saved)
    h     = silu(pre[:, :D]) * pre[:, D:]              [P, D]  sorted   (not saved)
    y[p]  = w[p] * (h @ W_down[e])                     [P, H]  pair order
    out   = sum_j y[t k' + j]                          [T, H]  fixed slot order, float32

Backward, given ``dout [T, H]``, reusing the forward's plan (no second sort)::

    g     = dout[token(r)] @ W_down[e]^T               [P, D]  sorted   (= dh / w)
    dw[p] = <h[r], g[r]>                               [P]     pair order
    dpre  = SwiGLU'(pre) * (w g)                       [P, 2D] sorted   (h recomputed from pre)
    dW_down[e]    = sum_r (w h)[r]^T dout[token(r)]    weight-gradient kernel (w h written by the step above)
    dW_gate_up[e] = sum_r x[token(r)]^T dpre[r]        weight-gradient kernel
    dx[t] = sum_j (dpre @ W_gate_up[e]^T)[t k' + j]    grouped GEMM scattered to pair order + combine,
                                                       a band of H columns at a time

``dw`` uses ``dout[t] . (h W_down) = h . (dout W_down^T)``: the ``[P, H]`` unscaled down output
is neither saved nor recomputed, since ``g`` is needed anyway for ``dh = w g``.

Saved activations: the gate|up pre-activations rather than a second gate|up GEMM in the
backward (that GEMM is 2/3 of the forward's FLOPs; its output is ``2D k'`` elements a token,
``h`` being recomputed from it elementwise), the routing weights in pair order, and the
plan. Per token, with ``b`` bytes per element: ``2 D k' b + 4 k'`` (weights) ``+ 8 k'``
(``sorted_to_pair``, ``pair_to_sorted``) ``+ ~8 k' / block_m`` (tile schedule) bytes, e.g.
41 KB for ``D = 2048, k' = 5`` in bfloat16. ``x`` and the weights are the caller's tensors,
saved by reference. Not saved: the gathered input copy ``[P, H]``, ``h``, the down output
``[P, H]``.

Backward workspace: ``dpre`` overwrites ``pre`` in place (its last reader is the kernel that
writes it), so ``pre`` is kept on ``ctx`` rather than through ``save_for_backward`` and
released by the backward: a second backward through the same graph (``retain_graph=True``)
raises instead of reading gradients as pre-activations. ``dx``'s pair-order rows are made a
band of at most ``max(2D, 1024)`` columns at a time, so that buffer is no larger than ``pre``
(``[P, 2D]``). The backward's peak beyond its outputs is then about ``P (2D + min(H, 2D)) b``
bytes, e.g. 0.49x of a ``torch._grouped_mm`` autograd step's on the competition's T = 8192.

``recompute=True`` saves no pre-activations: the forward is the inference one (SwiGLU in the
gate|up GEMM's epilogue) and the backward runs the steps above band by band over ``D``
(columns ``[d0, d1)`` of gate and of up, rows ``[d0, d1)`` of ``W_down``), recomputing each
band's ``pre`` with two plain GEMMs. ``dw`` and ``dx`` are sums over bands: ``dw`` in float32,
``dx`` through a float32 ``[T, H]`` sum that each band's scattered rows are combined into. The
weight gradients of a band are written in place into slices of the full gradients. Workspace:
a band's ``pre``, ``g`` (then ``w h``) and scattered ``dx`` rows, instead of the saved
``[P, 2D]``; cost: the gate|up GEMM once more and the launches of every band.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from moeflux.memory import check_fits, experts_backward_bytes, per_token_bytes
from moeflux.ops.dispatch import DispatchPlan, build_dispatch_plan
from moeflux.ops.experts import check_same_device
from moeflux.ops.experts.triton import check_forward_memory, combine_pairs, pair_weights
from moeflux.ops.grouped_matmul import GroupedMatmulConfig, grouped_matmul, select_config
from moeflux.ops.grouped_matmul.weight_grad import WeightGradConfig, grouped_weight_grad, long_row_loops


def _elementwise_blocks(width: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)``: up to 1024 columns, about 4096 elements a program."""
    block_d = min(1024, triton.next_power_of_2(max(width, 1)))
    return max(1, 4096 // block_d), block_d


@triton.jit
def _swiglu_kernel(
    pre_ptr,  # [P, 2D] gate | up
    h_ptr,  # [P, D]
    P,
    D,
    stride_pre,
    stride_h,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``h = silu(gate) * up``, in float32, rounded once."""
    i_r, i_d = tl.program_id(0), tl.program_id(1)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_rd = (o_r < P)[:, None] & (o_d < D)[None, :]
    p_gate = pre_ptr + o_r[:, None] * stride_pre + o_d[None, :]  # [BLOCK_R, BLOCK_D]
    b_gate = tl.load(p_gate, mask=m_rd, other=0.0).to(tl.float32)
    b_up = tl.load(p_gate + D, mask=m_rd, other=0.0).to(tl.float32)
    b_h = b_gate * tl.sigmoid(b_gate) * b_up
    tl.store(h_ptr + o_r[:, None] * stride_h + o_d[None, :], b_h.to(h_ptr.dtype.element_ty), mask=m_rd)


@triton.jit
def _swiglu_backward_kernel(
    pre_ptr,  # [P, 2D] gate | up, sorted
    g_wh_ptr,  # [P, D] sorted: in g = dout W_down^T, out w h (overwritten in place)
    d_pre_ptr,  # [P, 2D] sorted (may be pre_ptr: each element is loaded before it is stored)
    pair_weights_ptr,  # [P] float32, pair order
    d_pair_weights_ptr,  # [P] float32, pair order
    sorted_to_pair_ptr,  # [P] int32
    P,
    D,
    stride_pre,
    stride_g_wh,
    stride_d_pre,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dw = <h, g>``; ``dh = w g``; ``dgate = dh up silu'(gate)``, ``dup = dh silu(gate)``,
    ``silu'(z) = s(z) (1 + z (1 - s(z)))``; then ``w h`` replaces ``g`` (its last reader): the
    left operand of ``dW_down``, scaled here rather than by a pass of its own."""
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] sorted rows
    m_r = o_r < P
    o_pair = tl.load(sorted_to_pair_ptr + o_r, mask=m_r, other=0)
    b_w = tl.load(pair_weights_ptr + o_pair, mask=m_r, other=0.0)  # [BLOCK_R]
    o_r = o_r.to(tl.int64)
    b_dw = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        o_d = d_start + tl.arange(0, BLOCK_D)
        m_rd = m_r[:, None] & (o_d < D)[None, :]
        p_gate = pre_ptr + o_r[:, None] * stride_pre + o_d[None, :]  # [BLOCK_R, BLOCK_D]
        b_gate = tl.load(p_gate, mask=m_rd, other=0.0).to(tl.float32)
        b_up = tl.load(p_gate + D, mask=m_rd, other=0.0).to(tl.float32)
        p_g_wh = g_wh_ptr + o_r[:, None] * stride_g_wh + o_d[None, :]
        b_g = tl.load(p_g_wh, mask=m_rd, other=0.0).to(tl.float32)
        b_sigmoid = tl.sigmoid(b_gate)
        b_silu = b_gate * b_sigmoid
        # h rounded as the forward rounded it, so dw matches the h the down GEMM consumed.
        b_h = (b_silu * b_up).to(g_wh_ptr.dtype.element_ty)
        b_dw += tl.sum(b_h.to(tl.float32) * b_g, axis=1)
        b_dh = b_g * b_w[:, None]
        b_d_gate = b_dh * b_up * b_sigmoid * (1.0 + b_gate * (1.0 - b_sigmoid))
        p_d_gate = d_pre_ptr + o_r[:, None] * stride_d_pre + o_d[None, :]
        tl.store(p_d_gate, b_d_gate.to(d_pre_ptr.dtype.element_ty), mask=m_rd)
        tl.store(p_d_gate + D, (b_dh * b_silu).to(d_pre_ptr.dtype.element_ty), mask=m_rd)
        # w h rounded from the rounded h, as grouped_weight_grad's row scale rounds it.
        tl.store(p_g_wh, (b_h.to(tl.float32) * b_w[:, None]).to(g_wh_ptr.dtype.element_ty), mask=m_rd)
    tl.store(d_pair_weights_ptr + o_pair, b_dw, mask=m_r)


def _swiglu(pre: torch.Tensor) -> torch.Tensor:
    """``[P, 2D]`` gate|up -> ``[P, D]`` ``silu(gate) * up`` (rows contiguous in the last dim)."""
    P, D = pre.shape[0], pre.shape[1] // 2
    h = torch.empty(P, D, device=pre.device, dtype=pre.dtype)
    if P == 0 or D == 0:
        return h
    block_r, block_d = _elementwise_blocks(D)
    grid = (triton.cdiv(P, block_r), triton.cdiv(D, block_d))
    _swiglu_kernel[grid](pre, h, P, D, pre.stride(0), h.stride(0), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return h


def _swiglu_backward(
    pre: torch.Tensor, g: torch.Tensor, pair_weights: torch.Tensor, plan: DispatchPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dpre [P, 2D], dw [P] float32 pair order)``; overwrites ``g`` with ``w h`` and ``pre``
    with ``dpre`` (each element is read before it is written, by the same program)."""
    P, D = g.shape
    d_pre = pre
    d_pair_weights = torch.empty(P, device=pre.device, dtype=torch.float32)
    if P == 0:
        return d_pre, d_pair_weights
    block_r, block_d = _elementwise_blocks(D)
    _swiglu_backward_kernel[(triton.cdiv(P, block_r),)](
        pre, g, d_pre, pair_weights, d_pair_weights, plan.sorted_to_pair,
        P, D, pre.stride(0), g.stride(0), d_pre.stride(0),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return d_pre, d_pair_weights


class ExpertsFunction(torch.autograd.Function):
    """The experts of :func:`moeflux.ops.experts.triton.experts_triton` with a Triton backward
    (see the module docstring). Differentiable in ``x``, ``expert_weights``, ``gate_up``, ``down``."""

    @staticmethod
    def forward(
        ctx, x, expert_ids, expert_weights, gate_up, down, num_routed, gemm_config, weight_grad_config, check_ids,
        recompute,
    ):  # fmt: skip
        T, H = x.shape
        num_experts = down.shape[0]
        num_shared = num_experts - num_routed
        top_k = expert_ids.shape[1] + num_shared
        D = down.shape[1]
        check_forward_memory(T, H, D, expert_ids.shape[1], num_routed, num_shared, x, training=not recompute)
        # The plan is tiled for the first GEMM; the others re-tile it (a launch, not a sort).
        first = gemm_config or select_config(
            T * top_k, 2 * D, H, x.dtype, num_experts=num_experts, gather=True, device=x.device
        )
        plan = build_dispatch_plan(
            expert_ids, num_routed, num_shared_experts=num_shared, block_m=first.block_m, check_ids=check_ids
        )
        weights = pair_weights(expert_weights, num_shared).view(-1)  # [P] float32, pair order
        if recompute:  # the inference forward: SwiGLU in the gate|up GEMM's epilogue, nothing saved
            pre = None
            hidden = grouped_matmul(x, gate_up, plan, gather=True, swiglu=True, config=gemm_config)
        else:
            pre = grouped_matmul(x, gate_up, plan, gather=True, config=gemm_config)  # [P, 2D] sorted
            hidden = _swiglu(pre)  # [P, D] sorted
        # [P, H] pair order
        pair_out = grouped_matmul(hidden, down, plan, row_scale=weights, scatter=True, config=gemm_config)
        del hidden
        out = combine_pairs(pair_out.view(T, top_k, H))

        ctx.save_for_backward(x, gate_up, down, weights)
        ctx.pre = pre  # overwritten by its gradient in the backward (see the module docstring)
        ctx.plan = plan
        ctx.routed_k = expert_ids.shape[1]
        ctx.expert_weights_dtype = expert_weights.dtype
        ctx.configs = (gemm_config, weight_grad_config)
        ctx.recompute = recompute
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        if ctx.recompute:
            return _backward_recomputing(ctx, d_out)
        x, gate_up, down, weights = ctx.saved_tensors
        pre, ctx.pre = ctx.pre, None
        if pre is None:
            raise RuntimeError(
                "the Triton experts backward ran twice on one graph: its saved pre-activations were "
                "overwritten by their gradients the first time (retain_graph=True is not supported)"
            )
        plan: DispatchPlan = ctx.plan
        gemm_config, weight_grad_config = ctx.configs
        T, H = x.shape
        needs_x, _, needs_weights, needs_gate_up, needs_down = ctx.needs_input_grad[:5]
        _check_backward_memory(plan, ctx.routed_k, H, down.shape[1], x)
        d_out = d_out.to(x.dtype)

        # [P, D] sorted: g = dout[token(r)] @ W_down[e]^T (the forward's gather, transposed weight),
        # which _swiglu_backward, its last reader, overwrites with w h.
        g_then_wh = grouped_matmul(d_out, down.transpose(1, 2), plan, gather=True, config=gemm_config)
        d_pre, d_pair_weights = _swiglu_backward(pre, g_then_wh, weights, plan)
        d_down = None
        if needs_down:
            d_down = torch.empty_like(down, memory_format=torch.contiguous_format)
            _down_weight_grad(g_then_wh, d_out, plan, weight_grad_config, d_down)
        del g_then_wh
        d_gate_up = None
        if needs_gate_up:
            d_gate_up = grouped_weight_grad(x, d_pre, plan, a_rows="tokens", config=weight_grad_config)
        d_x = None
        if needs_x:
            d_x = torch.empty(T, H, device=x.device, dtype=x.dtype)
            for first, last in _column_bands(H, down.shape[1]):
                # [P, band] pair order, then its per-token sum into d_x[:, first:last].
                d_x_pairs = grouped_matmul(
                    d_pre, gate_up[:, first:last].transpose(1, 2), plan, scatter=True, config=gemm_config
                )
                combine_pairs(d_x_pairs.view(T, plan.top_k, last - first), out=d_x[:, first:last])
                del d_x_pairs
        del d_pre
        d_weights = None
        if needs_weights:
            d_weights = d_pair_weights.view(T, plan.top_k)[:, : ctx.routed_k].to(ctx.expert_weights_dtype)
        return d_x, None, d_weights, d_gate_up, d_down, None, None, None, None, None


def _down_weight_grad(
    scaled_hidden: torch.Tensor, d_out: torch.Tensor, plan: DispatchPlan, config, d_down: torch.Tensor
) -> None:
    """``d_down[e] = sum_r (w h)[r]^T dout[token(r)]``, written into ``d_down`` (``[E', D, H]`` or
    a band of its rows).

    With long row loops (:func:`~moeflux.ops.grouped_matmul.weight_grad.long_row_loops`) it is computed
    as its transpose into ``d_down``'s transposed view: the gathered ``dout`` then sits on the
    ``128 x 256`` tile's narrow side and the sorted ``w h`` on the wide side, read through TMA,
    as in ``dW_gate_up``. On the H100 that took dW_down from 2.46 to 2.09 ms at the
    competition's T = 8192, 1.95 to 1.67 ms on Mixtral and 2.90 to 2.48 ms on the DeepSeek-V3
    slice (``benchmarks/results/moe-train-h100-2026-11-25-0a800b2``). The short loops' ``128 x 128``
    tiles were 3-4% slower that way (a transposed pointer store), so they keep ``w h`` on the left.
    """
    if long_row_loops(d_out.dtype, plan.num_pairs / max(plan.num_experts, 1)):
        grouped_weight_grad(d_out, scaled_hidden, plan, a_rows="tokens", config=config, out=d_down.transpose(1, 2))
    else:
        grouped_weight_grad(scaled_hidden, d_out, plan, b_rows="tokens", config=config, out=d_down)


def _backward_recomputing(ctx, d_out):
    """:meth:`ExpertsFunction.backward` of a ``recompute`` forward: band by band over ``D``
    (see the module docstring), recomputing each band's gate|up pre-activations."""
    x, gate_up, down, weights = ctx.saved_tensors
    plan: DispatchPlan = ctx.plan
    gemm_config, weight_grad_config = ctx.configs
    T, H = x.shape
    D = down.shape[1]
    needs_x, _, needs_weights, needs_gate_up, needs_down = ctx.needs_input_grad[:5]
    _check_backward_memory(plan, ctx.routed_k, H, D, x, recompute=True)
    d_out = d_out.to(x.dtype)
    P = plan.num_pairs
    d_pair_weights = torch.zeros(P, device=x.device, dtype=torch.float32)
    d_down = torch.empty_like(down, memory_format=torch.contiguous_format) if needs_down else None
    d_gate_up = torch.empty_like(gate_up) if needs_gate_up else None
    # float32 across bands: each band adds a partial product over its D columns.
    d_x_sum = torch.zeros(T, H, device=x.device, dtype=torch.float32) if needs_x else None
    for d_first, d_last in _expert_bands(D):
        width = d_last - d_first
        gate, up = slice(d_first, d_last), slice(D + d_first, D + d_last)
        pre = torch.empty(P, 2 * width, device=x.device, dtype=x.dtype)  # [P, 2 width] sorted gate|up band
        grouped_matmul(x, gate_up[:, :, gate], plan, gather=True, out=pre[:, :width], config=gemm_config)
        grouped_matmul(x, gate_up[:, :, up], plan, gather=True, out=pre[:, width:], config=gemm_config)
        # [P, width]
        g_then_wh = grouped_matmul(d_out, down[:, gate].transpose(1, 2), plan, gather=True, config=gemm_config)
        d_pre, d_band_weights = _swiglu_backward(pre, g_then_wh, weights, plan)
        d_pair_weights += d_band_weights
        if needs_down:
            _down_weight_grad(g_then_wh, d_out, plan, weight_grad_config, d_down[:, gate])
        del g_then_wh
        # (Halves indexed in place: a loop variable holding a view would keep this band's
        # buffer alive into the next band.)
        halves = ((slice(0, width), gate), (slice(width, 2 * width), up))
        if needs_gate_up:
            for rows, columns in halves:
                grouped_weight_grad(x, d_pre[:, rows], plan, a_rows="tokens", config=weight_grad_config,
                                    out=d_gate_up[:, :, columns])  # fmt: skip
        if needs_x:
            for first, last in _column_bands(H, width):
                for rows, columns in halves:
                    d_x_pairs = grouped_matmul(d_pre[:, rows], gate_up[:, first:last, columns].transpose(1, 2), plan,
                                               scatter=True, config=gemm_config)  # fmt: skip
                    combine_pairs(d_x_pairs.view(T, plan.top_k, last - first), out=d_x_sum[:, first:last],
                                  accumulate=True)  # fmt: skip
                    del d_x_pairs
        del d_pre, pre
    d_x = d_x_sum.to(x.dtype) if needs_x else None
    d_weights = None
    if needs_weights:
        d_weights = d_pair_weights.view(T, plan.top_k)[:, : ctx.routed_k].to(ctx.expert_weights_dtype)
    return d_x, None, d_weights, d_gate_up, d_down, None, None, None, None, None


# Bands of a recomputing backward: at least RECOMPUTE_MIN_BAND expert columns, at most
# RECOMPUTE_MAX_BANDS of them. Its workspace is about P max(3 band, 2 band + min(H, max(2 band, 1024)))
# elements plus T H float32; each band costs about fifteen launches, whose host time showed
# on the H100 with Mixtral's 14 bands of 1024 (benchmarks/results/moe-train-h100-2026-11-25-66eef4f).
RECOMPUTE_MIN_BAND = 1024
RECOMPUTE_MAX_BANDS = 8


def _expert_bands(D: int) -> list[tuple[int, int]]:
    """``[first, last)`` ranges splitting the expert width ``D`` into bands (see
    :data:`RECOMPUTE_MIN_BAND`)."""
    width = max(RECOMPUTE_MIN_BAND, -(-D // RECOMPUTE_MAX_BANDS))
    return [(first, min(first + width, D)) for first in range(0, D, width)]


def _column_bands(H: int, D: int) -> list[tuple[int, int]]:
    """``[first, last)`` column ranges splitting ``H`` into equal bands of at most
    ``max(2D, 1024)`` columns, each a multiple of 256 but the last."""
    num_bands = -(-H // max(2 * D, 1024))
    width = -(-H // num_bands)
    width = -(-width // 256) * 256
    return [(first, min(first + width, H)) for first in range(0, H, width)]


def _check_backward_memory(
    plan: DispatchPlan, routed_k: int, H: int, D: int, x: torch.Tensor, *, recompute: bool = False
) -> None:
    """:func:`moeflux.memory.check_fits` for :meth:`ExpertsFunction.backward`."""
    num_shared = plan.top_k - routed_k
    num_routed = plan.num_experts - num_shared

    def workspace(tokens):
        return experts_backward_bytes(
            tokens, H, D, routed_k, num_routed, num_shared, x.dtype, recompute=recompute
        ).peak

    T = plan.num_tokens
    check_fits(workspace(T), x.device, "the Triton experts backward", per_token=lambda: per_token_bytes(workspace, T))


def experts_autograd(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    num_routed: int,
    *,
    gemm_config: GroupedMatmulConfig | None = None,
    weight_grad_config: WeightGradConfig | None = None,
    check_ids: bool = True,
    recompute: bool = False,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] SwiGLU_{ids[t, j]}(x[t]) + sum_s SwiGLU_{E + s}(x[t])``,
    differentiable in ``x``, ``expert_weights``, ``gate_up`` and ``down``, no host sync once
    ``check_ids`` is off.

    Args:
        x: ``[T, H]`` tokens, float32 / float16 / bfloat16, any strides.
        expert_ids: ``[T, k]`` integer routed expert ids in ``[0, num_routed)``.
        expert_weights: ``[T, k]`` their weights (computed in float32; the gradient comes
            back in their dtype).
        gate_up: ``[E + S, H, 2D]`` packed gate|up weights in ``x``'s dtype.
        down: ``[E + S, D, H]``.
        num_routed: ``E``; experts ``E .. E+S-1`` are the shared slices (weight 1).
        gemm_config: launch parameters of all four grouped GEMMs (``select_config`` per GEMM
            when omitted); tests pass small blocks.
        weight_grad_config: launch parameters of the two weight-gradient launches
            (:func:`moeflux.ops.grouped_matmul.weight_grad.select_weight_grad_config` when omitted).
        check_ids: verify ``0 <= expert_ids < num_routed`` and raise ``IndexError`` otherwise;
            one host sync (see :func:`moeflux.ops.dispatch.build_dispatch_plan`). Turn it off
            inside CUDA graphs and for ids known good, such as the router's.
        recompute: save no pre-activations; the backward recomputes them band by band over
            ``D`` (one more gate|up GEMM, about a third more FLOPs in the step) and its
            workspace shrinks to a band's. For memory-bound training, e.g. wide experts
            (Mixtral's ``D = 3.5 H``), where the saved ``[P, 2D]`` dominates.

    Returns:
        ``[T, H]`` in ``x.dtype``. ``T = 0`` gives an empty ``[0, H]`` (and zero weight gradients).

    Raises:
        torch.OutOfMemoryError: on CUDA, before any launch, when the forward (or later the
            backward) needs more device memory than is free
            (:func:`moeflux.memory.experts_forward_bytes`, :func:`~moeflux.memory.experts_backward_bytes`).
    """
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(
            f"expected x [T, H], gate_up [E+S, H, 2D] and down [E+S, D, H]; got {list(x.shape)}, "
            f"{list(gate_up.shape)} and {list(down.shape)}"
        )
    check_same_device(x=x, expert_ids=expert_ids, expert_weights=expert_weights, gate_up=gate_up, down=down)
    T, H = x.shape
    num_experts, D = down.shape[0], down.shape[1]
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or expert_weights.shape != expert_ids.shape:
        raise ValueError(
            f"expected expert_ids and expert_weights [T={T}, k], got {list(expert_ids.shape)} and "
            f"{list(expert_weights.shape)}"
        )
    if gate_up.shape != (num_experts, H, 2 * D) or down.shape != (num_experts, D, H) or num_experts < num_routed:
        raise ValueError(
            f"expected gate_up [E+S, {H}, 2D] and down [E+S, D, {H}] with E+S >= num_routed={num_routed}; "
            f"got {list(gate_up.shape)} and {list(down.shape)}"
        )
    return ExpertsFunction.apply(
        x, expert_ids, expert_weights, gate_up, down, num_routed, gemm_config, weight_grad_config, check_ids, recompute
    )


class GroupedMatmulFunction(torch.autograd.Function):
    """``out[dst(r)] = x[src(r)] @ W[e]`` (no epilogue) with gradients for ``x`` and ``W``."""

    @staticmethod
    def forward(ctx, x, weight, plan, gather, scatter, gemm_config, weight_grad_config):
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.gather, ctx.scatter = plan, gather, scatter
        ctx.configs = (gemm_config, weight_grad_config)
        return grouped_matmul(x, weight, plan, gather=gather, scatter=scatter, config=gemm_config)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        x, weight = ctx.saved_tensors
        plan: DispatchPlan = ctx.plan
        gemm_config, weight_grad_config = ctx.configs
        d_out = d_out.to(x.dtype)
        d_x = d_weight = None
        if ctx.needs_input_grad[0]:
            # Row r reads dout[dst(r)]: a pair-order dout is a gather over a plan of one pair a
            # token. dx[src(r)] sums over the rows that read a token: scatter to pair order, combine.
            pair_plan = dataclasses.replace(plan, num_tokens=plan.num_pairs, top_k=1)
            d_rows = grouped_matmul(
                d_out, weight.transpose(1, 2), pair_plan if ctx.scatter else plan,
                gather=ctx.scatter, scatter=ctx.gather, config=gemm_config,
            )  # fmt: skip
            d_x = combine_pairs(d_rows.view(plan.num_tokens, plan.top_k, -1)) if ctx.gather else d_rows
        if ctx.needs_input_grad[1]:
            d_weight = grouped_weight_grad(
                x, d_out, plan, a_rows="tokens" if ctx.gather else "sorted",
                b_rows="pairs" if ctx.scatter else "sorted", config=weight_grad_config,
            )  # fmt: skip
        return d_x, d_weight, None, None, None, None, None


def grouped_matmul_autograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: DispatchPlan,
    *,
    gather: bool = False,
    scatter: bool = False,
    gemm_config: GroupedMatmulConfig | None = None,
    weight_grad_config: WeightGradConfig | None = None,
) -> torch.Tensor:
    """:func:`moeflux.ops.grouped_matmul.grouped_matmul` without epilogue (no SwiGLU, no row
    scale), differentiable in ``x`` and ``weight``: ``dx`` is a grouped GEMM against
    ``W[e]^T`` (summed over a token's pairs when ``gather``), ``dW`` the weight-gradient kernel.
    ``plan`` must be the forward's (``x`` is ``[T, K]`` when ``gather``, else ``[P, K]``)."""
    return GroupedMatmulFunction.apply(x, weight, plan, gather, scatter, gemm_config, weight_grad_config)
