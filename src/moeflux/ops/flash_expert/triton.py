"""Triton flash expert: gathered rank-one experts without materialising the gathered rows.

The op is memory-bound: its bytes are the ``K`` rows each token reads from both pools. Every
kernel below is one streaming pass that sums in float32 in a fixed order (no atomics on the
default path, so results are bitwise reproducible run to run).

* ``_token_dot_kernel``: ``d = x[t] . pool[idx[t, j]]`` for a tile of tokens and all their
  ``K`` slots. Forward: ``x = hidden``, ``pool = down``, ``d`` is the score. Backward:
  ``x = grad_out``, ``pool = up``, ``d = g``, the loss's gradient with respect to the slot's
  coefficient ``w silu(score)``. A shared epilogue turns ``d`` into the per-pair terms.
* ``_sorted_dot_kernel``: the same dots over the ``(token, slot)`` pairs sorted by expert
  (``config.sorted_dots``). A pool row picked by several tokens is then read by neighbouring
  pairs and comes from HBM about once, but the x rows (and the repeats) come through L2.
* ``_combine_kernel``: ``out[t] = sum_j c[t, j] pool[idx[t, j]]``: the forward output
  (``c = w silu(score)``, ``pool = up``) and ``d_hidden`` (``c = d_score``, ``pool = down``).
  So the forward is two passes (scores, then output), each reading one pool once, and the
  backward two more plus the weight gradients.
* Weight gradients ``d_down[e] = sum d_score_p hidden[t_p]``, ``d_up[e] = sum coef_p
  grad_out[t_p]`` over expert ``e``'s segment of the pairs sorted by expert (a stable
  ``torch.sort``), for a tile of experts, writing every row exactly once (zeros for experts
  nobody picked), so the work is the compulsory ``[E, H]`` writes plus ``T K`` gathered rows:

  - ``_expert_grads_mma_kernel`` (bfloat16): each step takes a dense block of the tile's
    pairs and adds them into their experts' rows with a one-hot matmul on tensor cores.
  - ``_expert_grads_kernel`` (other dtypes): row r of the tile steps through expert r's
    pairs; segments longer than ``LONG_SEGMENT`` (hot experts) are summed a block of pairs
    at a time instead.
  - ``_atomic_expert_grads_kernel`` (``deterministic=False``): each pair adds its two rows
    into float32 ``[E, H]`` buffers with atomics: no sort, but run-to-run rounding
    differences and three passes over the float32 ``[E, H]`` (zero, accumulate, convert).

Lower bound: the dense weight gradients ``[E, H]`` must be written whole, ``2 E H``
elements. At ``E = 2**20``, ``H = 2048`` in bfloat16 that is 2 x 4 GiB, about 2.8 ms at
3 TB/s (1.4 ms at ``H = 1024``). Add the compulsory reads (each pass's ``T K`` gathered rows)
and, on an H100 at ``T = 8192`` (copy bandwidth 3.0 TB/s), forward+backward cannot beat
1.8 / 3.6 ms (``K = 16``, ``H = 1024 / 2048``) and 2.9 / 5.7 ms (``K = 64``) at ``E = 2**20``:
against the eager path (``naive.py``) that caps the speed-up at 4.2x / 4.6x and 9.1x / 10.4x,
so 10x is out of reach there and the kernels aim at the floor instead. At ``E = 2**16`` the
caps are 13-16x.

Tiles are a :class:`FlashExpertConfig` (one :class:`Tiles` per kernel); :func:`default_config`
picks them from ``(H, K, dtype)`` and callers may pass their own (``benchmarks/
flash_expert_gpu.py --sweep`` times candidates). Row offsets are ``int64 row * stride`` so
pools beyond 2**31 elements address correctly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeflux.memory import (
    check_fits,
    flash_expert_backward_bytes,
    flash_expert_forward_bytes,
    input_copy_bytes,
    per_token_bytes,
)

# Elements one program loads per step (all its gathered tiles together); bounds registers.
# Tests lower it so that the kernels loop over several chunks of H at small shapes.
MAX_TILE_ELEMENTS = 8192
# Stepping weight-gradient kernel: experts with more pairs than this are summed a block of
# pairs at a time (tests lower it).
LONG_SEGMENT = 32


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _pair_terms(
    b_dot,  # [...] float32: the score (forward) or g = grad_out . up (backward)
    o_pair,  # [...] pair ids t * K + j
    m_pair,
    routing_weights_ptr,  # [T * K]
    scores_ptr,  # [T * K] float32: written forward, read backward
    coef_ptr,  # [T * K] float32: w * silu(score), written
    grad_score_ptr,  # [T * K] float32: d loss / d score, written backward
    grad_routing_ptr,  # [T * K] routing weights' dtype: d loss / d w, written backward
    BACKWARD: tl.constexpr,
):
    b_weight = tl.load(routing_weights_ptr + o_pair, mask=m_pair, other=0.0).to(tl.float32)
    if BACKWARD:
        b_score = tl.load(scores_ptr + o_pair, mask=m_pair, other=0.0)
    else:
        b_score = b_dot
        tl.store(scores_ptr + o_pair, b_score, mask=m_pair)
    b_sigmoid = tl.sigmoid(b_score)
    b_silu = b_score * b_sigmoid
    # The backward stores it again: the weight gradients read it by pair.
    tl.store(coef_ptr + o_pair, b_weight * b_silu, mask=m_pair)
    if BACKWARD:
        b_silu_grad = b_sigmoid * (1.0 + b_score * (1.0 - b_sigmoid))
        tl.store(grad_score_ptr + o_pair, b_weight * b_silu_grad * b_dot, mask=m_pair)
        tl.store(grad_routing_ptr + o_pair, (b_silu * b_dot).to(grad_routing_ptr.dtype.element_ty), mask=m_pair)


@triton.jit
def _token_dot_kernel(
    x_ptr,  # [T, H]: hidden (forward) or grad_out (backward)
    pool_ptr,  # [E, H]: down (forward) or up (backward)
    indices_ptr,  # [T, K] int32 or int64, contiguous
    routing_weights_ptr,  # [T, K] contiguous
    scores_ptr,  # [T, K] float32
    coef_ptr,  # [T, K] float32
    grad_score_ptr,  # [T, K] float32, backward only
    grad_routing_ptr,  # [T, K], backward only
    T,
    H,
    K,
    stride_x_t,
    stride_pool_e,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    i_t = tl.program_id(0)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_t = o_t < T
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    o_pair = o_t[:, None] * K + o_k[None, :]  # [BLOCK_T, BLOCK_K]
    b_expert = tl.load(indices_ptr + o_pair, mask=m_tk, other=0).to(tl.int64)
    x_rows = x_ptr + o_t * stride_x_t  # [BLOCK_T]
    pool_rows = pool_ptr + b_expert * stride_pool_e  # [BLOCK_T, BLOCK_K]

    # Elementwise partial products, reduced over H once after the loop. A token's x chunk
    # is loaded once and shared by its K slots.
    b_products = tl.zeros([BLOCK_T, BLOCK_K, BLOCK_H], dtype=tl.float32)
    for h_start in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_x = tl.load(x_rows[:, None] + o_h[None, :], mask=m_t[:, None] & m_h[None, :], other=0.0)
        b_pool = tl.load(
            pool_rows[:, :, None] + o_h[None, None, :], mask=m_tk[:, :, None] & m_h[None, None, :], other=0.0
        )  # [BLOCK_T, BLOCK_K, BLOCK_H]
        b_products += b_pool.to(tl.float32) * b_x.to(tl.float32)[:, None, :]
    b_dot = tl.sum(b_products, axis=2)  # [BLOCK_T, BLOCK_K]
    _pair_terms(
        b_dot, o_pair, m_tk, routing_weights_ptr, scores_ptr, coef_ptr, grad_score_ptr, grad_routing_ptr, BACKWARD
    )


@triton.jit
def _sorted_dot_kernel(
    x_ptr,  # [T, H]: hidden (forward) or grad_out (backward)
    pool_ptr,  # [E, H]: down (forward) or up (backward)
    pair_order_ptr,  # [P] int64: pair ids t * K + j, sorted by expert (stable)
    sorted_experts_ptr,  # [P] int32: the experts of those pairs, ascending
    routing_weights_ptr,  # [P]
    scores_ptr,  # [P] float32
    coef_ptr,  # [P] float32
    grad_score_ptr,  # [P] float32, backward only
    grad_routing_ptr,  # [P], backward only
    P,
    H,
    K,
    stride_x_t,
    stride_pool_e,
    BACKWARD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    i_p = tl.program_id(0)
    o_q = i_p * BLOCK_P + tl.arange(0, BLOCK_P)  # positions in the sorted order
    m_q = o_q < P
    b_pair = tl.load(pair_order_ptr + o_q, mask=m_q, other=0)  # [BLOCK_P]
    b_expert = tl.load(sorted_experts_ptr + o_q, mask=m_q, other=0).to(tl.int64)
    x_rows = x_ptr + (b_pair // K) * stride_x_t
    # Neighbouring pairs mostly share their expert: its row is fetched from HBM once.
    pool_rows = pool_ptr + b_expert * stride_pool_e

    b_products = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    for h_start in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_ph = m_q[:, None] & (o_h < H)[None, :]
        b_x = tl.load(x_rows[:, None] + o_h[None, :], mask=m_ph, other=0.0)
        b_pool = tl.load(pool_rows[:, None] + o_h[None, :], mask=m_ph, other=0.0)  # [BLOCK_P, BLOCK_H]
        b_products += b_pool.to(tl.float32) * b_x.to(tl.float32)
    b_dot = tl.sum(b_products, axis=1)  # [BLOCK_P]
    _pair_terms(
        b_dot, b_pair, m_q, routing_weights_ptr, scores_ptr, coef_ptr, grad_score_ptr, grad_routing_ptr, BACKWARD
    )


@triton.jit
def _combine_kernel(
    pool_ptr,  # [E, H]: up (forward) or down (backward)
    indices_ptr,  # [T, K] contiguous
    coef_ptr,  # [T, K] float32: w * silu(score) (forward) or d_score (backward)
    out_ptr,  # [T, H] contiguous: out (forward) or d_hidden (backward)
    T,
    H,
    K,
    stride_pool_e,
    num_h_blocks,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # H blocks vary fastest, so programs running side by side read whole pool rows.
    i_h = tl.program_id(0) % num_h_blocks
    i_t = tl.program_id(0) // num_h_blocks
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_t = o_t < T
    m_th = m_t[:, None] & (o_h < H)[None, :]

    b_out = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    # One slot per step: gathers independent of the sum, so NUM_STAGES - 1 steps are in
    # flight at once (without tl.range's stages, Triton pipelines only loops with a dot);
    # the slots add up in index order.
    for j in tl.range(0, K, num_stages=NUM_STAGES):
        b_expert = tl.load(indices_ptr + o_t * K + j, mask=m_t, other=0).to(tl.int64)  # [BLOCK_T]
        b_coef = tl.load(coef_ptr + o_t * K + j, mask=m_t, other=0.0)
        b_pool = tl.load(pool_ptr + b_expert[:, None] * stride_pool_e + o_h[None, :], mask=m_th, other=0.0)
        b_out += b_coef[:, None] * b_pool.to(tl.float32)  # [BLOCK_T, BLOCK_H]
    tl.store(out_ptr + o_t[:, None] * H + o_h[None, :], b_out.to(out_ptr.dtype.element_ty), mask=m_th)


@triton.jit
def _add_pair_rows(
    b_grad_down,  # [ROWS, BLOCK_H] float32 accumulators
    b_grad_up,
    b_pair,  # [ROWS] pair ids
    m_pair,  # [ROWS]
    o_h,  # [BLOCK_H]
    m_h,
    hidden_ptr,
    grad_out_ptr,
    grad_score_ptr,
    coef_ptr,
    K,
    stride_hidden_t,
    stride_grad_out_t,
    GRAD_DOWN: tl.constexpr,
    GRAD_UP: tl.constexpr,
):
    """Row r of the accumulators gains pair ``b_pair[r]``'s terms: ``d_score hidden[t]`` for
    d_down and ``coef grad_out[t]`` for d_up."""
    b_token = b_pair // K
    m_ph = m_pair[:, None] & m_h[None, :]
    if GRAD_DOWN:
        b_grad_score = tl.load(grad_score_ptr + b_pair, mask=m_pair, other=0.0)
        b_hidden = tl.load(hidden_ptr + b_token[:, None] * stride_hidden_t + o_h[None, :], mask=m_ph, other=0.0)
        b_grad_down += b_grad_score[:, None] * b_hidden.to(tl.float32)
    if GRAD_UP:
        b_coef = tl.load(coef_ptr + b_pair, mask=m_pair, other=0.0)
        b_grad_out = tl.load(grad_out_ptr + b_token[:, None] * stride_grad_out_t + o_h[None, :], mask=m_ph, other=0.0)
        b_grad_up += b_coef[:, None] * b_grad_out.to(tl.float32)
    return b_grad_down, b_grad_up


@triton.jit
def _expert_grads_kernel(
    hidden_ptr,  # [T, H]
    grad_out_ptr,  # [T, H]
    pair_order_ptr,  # [P] int64: pair ids sorted by expert, stable
    expert_starts_ptr,  # [E + 1] int32: expert e owns pair_order[starts[e] : starts[e + 1]]
    grad_score_ptr,  # [P] float32, by pair id
    coef_ptr,  # [P] float32, by pair id
    grad_down_ptr,  # [E, H] contiguous, down's dtype; every row written (GRAD_DOWN)
    grad_up_ptr,  # [E, H] contiguous, up's dtype; every row written (GRAD_UP)
    E,
    H,
    K,
    stride_hidden_t,
    stride_grad_out_t,
    num_expert_blocks,
    h_span,  # H elements one program covers: BLOCK_H (H split across programs) or H
    GRAD_DOWN: tl.constexpr,
    GRAD_UP: tl.constexpr,
    LONG: tl.constexpr,  # segments longer than this take the blocked path below
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Expert blocks vary fastest: the programs running at one time share one span of H, so
    # the hidden / grad_out rows they gather (all T of them, one span wide) stay in L2.
    i_e = tl.program_id(0) % num_expert_blocks
    i_h = tl.program_id(0) // num_expert_blocks
    o_e = i_e * BLOCK_E + tl.arange(0, BLOCK_E)
    m_e = o_e < E
    b_start = tl.load(expert_starts_ptr + o_e, mask=m_e, other=0)  # [BLOCK_E]
    b_length = tl.load(expert_starts_ptr + o_e + 1, mask=m_e, other=0) - b_start
    m_short = b_length <= LONG
    b_steps = tl.where(m_short, b_length, 0)
    num_steps = tl.max(b_steps, axis=0)
    o_rows = o_e.to(tl.int64) * H  # [BLOCK_E] row offsets in the [E, H] gradients
    h_lo = i_h * h_span
    h_hi = tl.minimum(h_lo + h_span, H)

    # Short segments: row r of the tile is expert o_e[r]; step j adds its j-th pair, so each
    # row sums its pairs in sorted (token, slot) order. Empty rows store zeros.
    for h_start in range(h_lo, h_hi, BLOCK_H):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_h = o_h < h_hi
        b_grad_down = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
        b_grad_up = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
        for j in tl.range(0, num_steps, num_stages=NUM_STAGES):
            m_j = j < b_steps
            b_pair = tl.load(pair_order_ptr + b_start + j, mask=m_j, other=0)
            b_grad_down, b_grad_up = _add_pair_rows(
                b_grad_down, b_grad_up, b_pair, m_j, o_h, m_h, hidden_ptr, grad_out_ptr, grad_score_ptr, coef_ptr,
                K, stride_hidden_t, stride_grad_out_t, GRAD_DOWN, GRAD_UP,
            )  # fmt: skip
        m_store = (m_e & m_short)[:, None] & m_h[None, :]
        o_store = o_rows[:, None] + o_h[None, :]  # [BLOCK_E, BLOCK_H]
        if GRAD_DOWN:
            tl.store(grad_down_ptr + o_store, b_grad_down.to(grad_down_ptr.dtype.element_ty), mask=m_store)
        if GRAD_UP:
            tl.store(grad_up_ptr + o_store, b_grad_up.to(grad_up_ptr.dtype.element_ty), mask=m_store)

    # Long segments (hot experts, rare): one at a time, BLOCK_E of its pairs per step, the
    # lanes summed once at the end. Fixed order again, so still reproducible.
    if tl.max(b_length, axis=0) > LONG:
        for r in range(0, BLOCK_E):
            e = i_e * BLOCK_E + r
            seg_start = tl.load(expert_starts_ptr + e, mask=e < E, other=0)
            seg_end = tl.load(expert_starts_ptr + e + 1, mask=e < E, other=0)
            if seg_end - seg_start > LONG:
                for h_start in range(h_lo, h_hi, BLOCK_H):
                    o_h = h_start + tl.arange(0, BLOCK_H)
                    m_h = o_h < h_hi
                    b_grad_down = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
                    b_grad_up = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
                    for p_start in tl.range(seg_start, seg_end, BLOCK_E, num_stages=NUM_STAGES):
                        o_p = p_start + tl.arange(0, BLOCK_E)
                        m_p = o_p < seg_end
                        b_pair = tl.load(pair_order_ptr + o_p, mask=m_p, other=0)
                        b_grad_down, b_grad_up = _add_pair_rows(
                            b_grad_down, b_grad_up, b_pair, m_p, o_h, m_h, hidden_ptr, grad_out_ptr,
                            grad_score_ptr, coef_ptr, K, stride_hidden_t, stride_grad_out_t, GRAD_DOWN, GRAD_UP,
                        )  # fmt: skip
                    row = e.to(tl.int64) * H + o_h  # [BLOCK_H]
                    if GRAD_DOWN:
                        b_row = tl.sum(b_grad_down, axis=0)
                        tl.store(grad_down_ptr + row, b_row.to(grad_down_ptr.dtype.element_ty), mask=m_h)
                    if GRAD_UP:
                        b_row = tl.sum(b_grad_up, axis=0)
                        tl.store(grad_up_ptr + row, b_row.to(grad_up_ptr.dtype.element_ty), mask=m_h)


@triton.jit
def _split_dot(b_coef, b_x, b_acc):
    """``b_acc += b_coef @ b_x`` on tensor cores at about float32 precision: the float32
    coefficients ``[M, P]`` go in as two bfloat16 parts (16 significant bits); ``b_x`` is
    bfloat16 already, so every product is exact and the MMA accumulates in float32."""
    b_hi = b_coef.to(tl.bfloat16)
    b_lo = (b_coef - b_hi.to(tl.float32)).to(tl.bfloat16)
    b_acc = tl.dot(b_hi, b_x, b_acc)
    return tl.dot(b_lo, b_x, b_acc)


@triton.jit
def _expert_grads_mma_kernel(
    hidden_ptr,  # [T, H] bfloat16
    grad_out_ptr,  # [T, H] bfloat16
    pair_order_ptr,  # [P] int64: pair ids sorted by expert, stable
    sorted_experts_ptr,  # [P] int32: their experts, ascending
    expert_starts_ptr,  # [E + 1] int32
    grad_score_ptr,  # [P] float32, by pair id
    coef_ptr,  # [P] float32, by pair id
    grad_down_ptr,  # [E, H] contiguous bfloat16; every row written (GRAD_DOWN)
    grad_up_ptr,  # [E, H] contiguous bfloat16; every row written (GRAD_UP)
    E,
    H,
    K,
    stride_hidden_t,
    stride_grad_out_t,
    num_expert_blocks,
    h_span,  # H elements one program covers: BLOCK_H (H split across programs) or H
    GRAD_DOWN: tl.constexpr,
    GRAD_UP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # The pairs of experts [e_lo, e_lo + BLOCK_E) are one contiguous run of the sorted
    # order. Each step takes BLOCK_P of them as a dense [BLOCK_P, BLOCK_H] tile of gathered
    # rows and adds them into their experts' rows with a one-hot matmul: no lanes idle on
    # short segments, and a hot expert just makes its tile take more (full) steps. Fixed
    # order (steps in sequence, the MMA's own order within one), so bitwise reproducible.
    i_e = tl.program_id(0) % num_expert_blocks
    i_h = tl.program_id(0) // num_expert_blocks
    e_lo = i_e * BLOCK_E
    p_lo = tl.load(expert_starts_ptr + e_lo)
    p_hi = tl.load(expert_starts_ptr + tl.minimum(e_lo + BLOCK_E, E))
    o_e = e_lo + tl.arange(0, BLOCK_E)
    o_rows = o_e.to(tl.int64) * H  # [BLOCK_E]
    h_lo = i_h * h_span
    h_hi = tl.minimum(h_lo + h_span, H)
    for h_start in range(h_lo, h_hi, BLOCK_H):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_h = o_h < h_hi
        b_grad_down = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
        b_grad_up = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
        for p_start in tl.range(p_lo, p_hi, BLOCK_P, num_stages=NUM_STAGES):
            o_p = p_start + tl.arange(0, BLOCK_P)
            m_p = o_p < p_hi
            b_pair = tl.load(pair_order_ptr + o_p, mask=m_p, other=0)  # [BLOCK_P]
            b_expert = tl.load(sorted_experts_ptr + o_p, mask=m_p, other=-1)
            m_sel = o_e[:, None] == b_expert[None, :]  # [BLOCK_E, BLOCK_P]: pair p is row r's
            b_token = b_pair // K
            m_ph = m_p[:, None] & m_h[None, :]
            if GRAD_DOWN:
                b_grad_score = tl.load(grad_score_ptr + b_pair, mask=m_p, other=0.0)
                b_hidden = tl.load(hidden_ptr + b_token[:, None] * stride_hidden_t + o_h[None, :], mask=m_ph, other=0.0)
                b_grad_down = _split_dot(tl.where(m_sel, b_grad_score[None, :], 0.0), b_hidden, b_grad_down)
            if GRAD_UP:
                b_coef = tl.load(coef_ptr + b_pair, mask=m_p, other=0.0)
                b_grad_out = tl.load(
                    grad_out_ptr + b_token[:, None] * stride_grad_out_t + o_h[None, :], mask=m_ph, other=0.0
                )  # [BLOCK_P, BLOCK_H]
                b_grad_up = _split_dot(tl.where(m_sel, b_coef[None, :], 0.0), b_grad_out, b_grad_up)
        m_store = (o_e < E)[:, None] & m_h[None, :]
        o_store = o_rows[:, None] + o_h[None, :]  # [BLOCK_E, BLOCK_H]
        if GRAD_DOWN:
            tl.store(grad_down_ptr + o_store, b_grad_down.to(grad_down_ptr.dtype.element_ty), mask=m_store)
        if GRAD_UP:
            tl.store(grad_up_ptr + o_store, b_grad_up.to(grad_up_ptr.dtype.element_ty), mask=m_store)


@triton.jit
def _atomic_expert_grads_kernel(
    hidden_ptr,  # [T, H]
    grad_out_ptr,  # [T, H]
    indices_ptr,  # [T, K] contiguous
    grad_score_ptr,  # [T, K] float32
    coef_ptr,  # [T, K] float32
    grad_down_acc_ptr,  # [E, H] contiguous float32, zeroed (GRAD_DOWN)
    grad_up_acc_ptr,  # [E, H] contiguous float32, zeroed (GRAD_UP)
    T,
    H,
    K,
    stride_hidden_t,
    stride_grad_out_t,
    num_h_blocks,
    GRAD_DOWN: tl.constexpr,
    GRAD_UP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_h = tl.program_id(0) % num_h_blocks
    i_t = tl.program_id(0) // num_h_blocks
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_t = o_t < T
    m_th = m_t[:, None] & (o_h < H)[None, :]
    # A token's rows are loaded once and added into each of its K experts' rows.
    if GRAD_DOWN:
        b_hidden = tl.load(hidden_ptr + o_t[:, None] * stride_hidden_t + o_h[None, :], mask=m_th, other=0.0)
    if GRAD_UP:
        b_grad_out = tl.load(grad_out_ptr + o_t[:, None] * stride_grad_out_t + o_h[None, :], mask=m_th, other=0.0)
    for j in range(0, K):
        o_pair = o_t * K + j
        b_expert = tl.load(indices_ptr + o_pair, mask=m_t, other=0).to(tl.int64)
        o_acc = b_expert[:, None] * H + o_h[None, :]  # [BLOCK_T, BLOCK_H]
        if GRAD_DOWN:
            b_grad_score = tl.load(grad_score_ptr + o_pair, mask=m_t, other=0.0)
            b_add = b_grad_score[:, None] * b_hidden.to(tl.float32)
            tl.atomic_add(grad_down_acc_ptr + o_acc, b_add, mask=m_th, sem="relaxed")
        if GRAD_UP:
            b_coef = tl.load(coef_ptr + o_pair, mask=m_t, other=0.0)
            b_add = b_coef[:, None] * b_grad_out.to(tl.float32)
            tl.atomic_add(grad_up_acc_ptr + o_acc, b_add, mask=m_th, sem="relaxed")


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


class Tiles(NamedTuple):
    """Tile of one kernel: ``rows`` per program (tokens for the token dot and the combine,
    sorted pairs for the sorted dot, experts for the weight gradients) times ``block_h`` of H,
    plus the launch's warps and software-pipelining stages (``tl.range`` stages of the
    kernel's gather loop). Weight gradients only: ``h_loop``, whether one program walks all
    of H (else H is split across programs; ``None``: walk it when ``T K < E``, where the
    programs mostly write zero rows and their setup is worth amortising), and ``block_p``,
    pairs per step of the tensor-core kernel (bfloat16 only; 0 picks the kernel that steps
    through each expert's pairs one at a time)."""

    rows: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 3
    h_loop: bool | None = None
    block_p: int = 0


@dataclass(frozen=True)
class FlashExpertConfig:
    """Tiles for each kernel, and ``sorted_dots``: compute the dots over the pairs sorted by
    expert (the forward then sorts, and the backward reuses the order). That reads a pool row
    picked by several tokens from HBM about once, but gathers the x rows (and the repeats)
    through L2 instead, so it pays only when ``T K`` is well above ``E``; off by default."""

    token_dot: Tiles
    sorted_dot: Tiles
    combine: Tiles
    expert_grads: Tiles
    sorted_dots: bool = False

    def replace(self, **changes) -> FlashExpertConfig:
        return replace(self, **changes)


def _block_k(K: int) -> int:
    return max(2, triton.next_power_of_2(max(K, 1)))


def _warps(elements: int) -> int:
    return 8 if elements >= 8192 else 4


def default_config(H: int, K: int, dtype: torch.dtype = torch.bfloat16) -> FlashExpertConfig:
    """Tiles from ``(H, K, dtype)``: chunks of H of 256 16-bit (128 32-bit) elements, 512
    contiguous bytes per gathered row, and about ``MAX_TILE_ELEMENTS`` gathered per step."""
    budget = MAX_TILE_ELEMENTS
    h = max(16, triton.next_power_of_2(max(H, 1)))
    chunk = 256 if dtype.itemsize <= 2 else 128

    def block_h(limit: int) -> int:
        return max(16, min(h, chunk, limit))

    block_k = _block_k(K)
    # Token dot: BLOCK_T tokens x all K slots x BLOCK_H.
    dot_h = block_h(budget // block_k)
    dot_rows = max(1, budget // (block_k * dot_h))
    token_dot = Tiles(dot_rows, dot_h, _warps(dot_rows * block_k * dot_h), 3)
    # Sorted dot and combine: [rows, BLOCK_H] tiles; the sorted dot gathers two of them.
    pair_h = block_h(budget // 32)
    pair_rows = max(2, budget // 2 // pair_h)
    sorted_dot = Tiles(pair_rows, pair_h, _warps(2 * pair_rows * pair_h), 3)
    combine = Tiles(pair_rows, pair_h, 4, 3)
    # Weight gradients: two float32 accumulators [rows, BLOCK_H] held through the program.
    if dtype == torch.bfloat16:
        # Tensor-core kernel: 16 experts x 128 of H, 16 pairs per step, 2 warps, no software
        # pipelining (small programs, many resident per SM, hide the gathers' latency better
        # than deeper stages). In the H100 sweep (benchmarks/results/
        # flash-expert-sweep-h100-2026-11-25-87b596c) it was the fastest of 42 tiles at seven
        # of the eight benchmark shapes and 0.5% behind at the eighth, 1.15-1.55x faster than
        # the tiles it replaced; the dot needs every dimension >= 16.
        expert_grads = Tiles(16, block_h(128), 2, 1, None, 16)
    else:
        grad_h = block_h(min(128, budget // 64))
        expert_grads = Tiles(max(2, budget // 4 // grad_h), grad_h, 4, 2, None, 0)
    return FlashExpertConfig(token_dot, sorted_dot, combine, expert_grads)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


class SortedPairs(NamedTuple):
    """The ``(token, slot)`` pairs grouped by expert: ``order [P]`` int64 pair ids ``t K + j``
    (within an expert in ascending order) and ``experts [P]`` int32, ascending."""

    order: torch.Tensor
    experts: torch.Tensor


def sort_pairs(indices: torch.Tensor) -> SortedPairs:
    """Stable sort of the flattened ``[T, K]`` expert ids (32-bit keys: half the radix
    passes of 64-bit ones; ids are below E, and an ``[E, H]`` pool has E < 2**31 rows)."""
    experts, order = torch.sort(indices.reshape(-1).to(torch.int32), stable=True)
    return SortedPairs(order, experts)


def expert_starts(pairs: SortedPairs, num_experts: int) -> torch.Tensor:
    """``[E + 1]`` int32: expert e owns sorted positions ``starts[e] : starts[e + 1]``."""
    boundaries = torch.arange(num_experts + 1, device=pairs.experts.device, dtype=torch.int32)
    return torch.searchsorted(pairs.experts, boundaries, out_int32=True)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _sort_beside(indices: torch.Tensor, num_experts: int) -> tuple[SortedPairs, torch.Tensor, object]:
    """``(pairs, starts, join)``: :func:`sort_pairs` and :func:`expert_starts`, on CUDA run on
    a side stream: a few small latency-bound kernels that then overlap the backward's
    bandwidth-bound dots. Call ``join()`` before the current stream uses them."""
    if not indices.is_cuda:
        pairs = sort_pairs(indices)
        return pairs, expert_starts(pairs, num_experts), lambda: None
    current = torch.cuda.current_stream(indices.device)
    side = _SIDE_STREAMS.get(indices.device)
    if side is None:
        side = _SIDE_STREAMS[indices.device] = torch.cuda.Stream(indices.device)
    side.wait_stream(current)  # the indices are ready
    with torch.cuda.stream(side):
        pairs = sort_pairs(indices)
        starts = expert_starts(pairs, num_experts)
    indices.record_stream(side)

    def join():
        current.wait_stream(side)
        for tensor in (*pairs, starts):  # allocated on the side stream, freed after use here
            tensor.record_stream(current)

    return pairs, starts, join


def _config(config: FlashExpertConfig | None, H: int, K: int, dtype: torch.dtype) -> FlashExpertConfig:
    return default_config(H, K, dtype) if config is None else config


def launch_dots(
    x: torch.Tensor,
    pool: torch.Tensor,
    indices: torch.Tensor,
    routing_weights: torch.Tensor,
    scores: torch.Tensor,
    coef: torch.Tensor,
    grad_score: torch.Tensor | None = None,
    grad_routing: torch.Tensor | None = None,
    *,
    pairs: SortedPairs | None = None,
    config: FlashExpertConfig | None = None,
) -> None:
    """``d[t, j] = x[t] . pool[indices[t, j]]`` and the per-pair terms, in token order or, with
    ``pairs``, in expert order. Forward (``grad_score`` None): write ``scores = d`` and
    ``coef = w silu(d)``. Backward: read ``scores``; write ``coef``, ``grad_score = w silu'(s)
    d`` and ``grad_routing = silu(s) d``. ``[T, K]`` buffers contiguous; x and pool need unit
    stride along H."""
    T, H = x.shape
    K = indices.shape[1]
    if T * K == 0:
        return
    backward = grad_score is not None
    if backward != (grad_routing is not None):
        raise ValueError("pass both grad_score and grad_routing (backward), or neither (forward)")
    config = _config(config, H, K, x.dtype)
    if pairs is None:
        tiles = config.token_dot
        _token_dot_kernel[(triton.cdiv(T, tiles.rows),)](
            x, pool, indices, routing_weights, scores, coef, grad_score, grad_routing,
            T, H, K, x.stride(0), pool.stride(0),
            BACKWARD=backward, BLOCK_T=tiles.rows, BLOCK_K=_block_k(K), BLOCK_H=tiles.block_h,
            NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps,
        )  # fmt: skip
    else:
        tiles = config.sorted_dot
        P = T * K
        _sorted_dot_kernel[(triton.cdiv(P, tiles.rows),)](
            x, pool, pairs.order, pairs.experts, routing_weights, scores, coef, grad_score, grad_routing,
            P, H, K, x.stride(0), pool.stride(0),
            BACKWARD=backward, BLOCK_P=tiles.rows, BLOCK_H=tiles.block_h,
            NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps,
        )  # fmt: skip


def launch_combine(
    pool: torch.Tensor,
    indices: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    *,
    config: FlashExpertConfig | None = None,
) -> None:
    """``out[t] = sum_j coef[t, j] pool[indices[t, j]]`` (``out [T, H]`` contiguous, written
    whole; zeros when K = 0)."""
    T, H = out.shape
    K = indices.shape[1]
    if T * H == 0:
        return
    tiles = _config(config, H, K, out.dtype).combine
    num_h_blocks = triton.cdiv(H, tiles.block_h)
    _combine_kernel[(num_h_blocks * triton.cdiv(T, tiles.rows),)](
        pool, indices, coef, out, T, H, K, pool.stride(0), num_h_blocks,
        BLOCK_T=tiles.rows, BLOCK_H=tiles.block_h, NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps,
    )  # fmt: skip


def _tensor_cores(tensor: torch.Tensor) -> bool:
    """Whether the tensor-core weight-gradient kernel may run: on CUDA tensors. (Triton 3.6's
    interpreter multiplies bfloat16 dot operands as their raw bits, so on the CPU the
    stepping kernel runs; the tests patch both to cover the tensor-core kernel.)"""
    return tensor.is_cuda


def launch_expert_grads(
    hidden: torch.Tensor,
    grad_out: torch.Tensor,
    pairs: SortedPairs,
    grad_score: torch.Tensor,
    coef: torch.Tensor,
    grad_down: torch.Tensor | None,
    grad_up: torch.Tensor | None,
    *,
    starts: torch.Tensor | None = None,
    config: FlashExpertConfig | None = None,
) -> None:
    """Write every row of ``grad_down`` and ``grad_up`` (contiguous ``[E, H]``; either may be
    None) by a deterministic per-expert reduction over the sorted pairs. ``starts`` is
    :func:`expert_starts`, computed here when not given."""
    target = grad_down if grad_down is not None else grad_up
    if target is None:
        return
    E, H = target.shape
    K = grad_score.shape[1]
    if E * H == 0:
        return
    if starts is None:
        starts = expert_starts(pairs, E)
    tiles = _config(config, H, K, target.dtype).expert_grads
    h_loop = tiles.h_loop if tiles.h_loop is not None else grad_score.numel() < E
    h_span = H if h_loop else tiles.block_h
    bf16 = all(t.dtype == torch.bfloat16 for t in (hidden, grad_out, grad_down, grad_up) if t is not None)
    if tiles.block_p > 0 and bf16 and _tensor_cores(hidden):
        block_e = max(16, tiles.rows)  # tl.dot wants every dimension >= 16
        num_expert_blocks = triton.cdiv(E, block_e)
        _expert_grads_mma_kernel[(num_expert_blocks * triton.cdiv(H, h_span),)](
            hidden, grad_out, pairs.order, pairs.experts, starts, grad_score, coef, grad_down, grad_up,
            E, H, K, hidden.stride(0), grad_out.stride(0), num_expert_blocks, h_span,
            GRAD_DOWN=grad_down is not None, GRAD_UP=grad_up is not None, BLOCK_E=block_e,
            BLOCK_P=max(16, tiles.block_p), BLOCK_H=max(16, tiles.block_h), NUM_STAGES=tiles.num_stages,
            num_warps=tiles.num_warps,
        )  # fmt: skip
        return
    num_expert_blocks = triton.cdiv(E, tiles.rows)
    _expert_grads_kernel[(num_expert_blocks * triton.cdiv(H, h_span),)](
        hidden, grad_out, pairs.order, starts, grad_score, coef, grad_down, grad_up,
        E, H, K, hidden.stride(0), grad_out.stride(0), num_expert_blocks, h_span,
        GRAD_DOWN=grad_down is not None, GRAD_UP=grad_up is not None, LONG=max(LONG_SEGMENT, 1),
        BLOCK_E=tiles.rows, BLOCK_H=tiles.block_h, NUM_STAGES=tiles.num_stages, num_warps=tiles.num_warps,
    )  # fmt: skip


def launch_atomic_expert_grads(
    hidden: torch.Tensor,
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    grad_score: torch.Tensor,
    coef: torch.Tensor,
    grad_down_acc: torch.Tensor | None,
    grad_up_acc: torch.Tensor | None,
    *,
    config: FlashExpertConfig | None = None,
) -> None:
    """Add every pair's weight-gradient rows into zeroed float32 ``[E, H]`` buffers (atomics:
    the summation order, hence the last bits, vary from run to run)."""
    T, H = hidden.shape
    K = indices.shape[1]
    if T * K * H == 0 or (grad_down_acc is None and grad_up_acc is None):
        return
    tiles = _config(config, H, K, hidden.dtype).combine
    num_h_blocks = triton.cdiv(H, tiles.block_h)
    _atomic_expert_grads_kernel[(num_h_blocks * triton.cdiv(T, tiles.rows),)](
        hidden, grad_out, indices, grad_score, coef, grad_down_acc, grad_up_acc,
        T, H, K, hidden.stride(0), grad_out.stride(0), num_h_blocks,
        GRAD_DOWN=grad_down_acc is not None, GRAD_UP=grad_up_acc is not None,
        BLOCK_T=tiles.rows, BLOCK_H=tiles.block_h, num_warps=tiles.num_warps,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class FlashExpertFunction(torch.autograd.Function):
    """Autograd over the Triton kernels; saves the inputs, the ``[T, K]`` float32 scores and,
    with ``config.sorted_dots``, the pairs in expert order."""

    @staticmethod
    def forward(ctx, hidden, down, up, indices, routing_weights, deterministic, config):
        T, H = hidden.shape
        E, K = down.shape[0], indices.shape[1]
        config = _config(config, H, K, hidden.dtype)

        def workspace(tokens):
            return flash_expert_forward_bytes(tokens, H, E, K, hidden.dtype, sorted_dots=config.sorted_dots).peak

        copies = input_copy_bytes(hidden, down, up) + sum(
            t.numel() * t.element_size() for t in (indices, routing_weights) if not t.is_contiguous()
        )
        check_fits(workspace(T) + copies, hidden.device, "the Triton flash_expert forward",
                   per_token=lambda: per_token_bytes(workspace, T))  # fmt: skip
        hidden, down, up = _unit_stride_rows(hidden), _unit_stride_rows(down), _unit_stride_rows(up)
        indices, routing_weights = indices.contiguous(), routing_weights.contiguous()
        device = hidden.device
        pairs = sort_pairs(indices) if config.sorted_dots and T * K > 0 else None
        out = torch.empty(T, H, device=device, dtype=hidden.dtype)
        scores = torch.empty(T, K, device=device, dtype=torch.float32)
        coef = torch.empty(T, K, device=device, dtype=torch.float32)
        launch_dots(hidden, down, indices, routing_weights, scores, coef, pairs=pairs, config=config)
        launch_combine(up, indices, coef, out, config=config)
        ctx.save_for_backward(hidden, down, up, indices, routing_weights, scores, *(pairs or (None, None)))
        ctx.deterministic = deterministic
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, down, up, indices, routing_weights, scores, order, sorted_experts = ctx.saved_tensors
        need_hidden, need_down, need_up, _, need_routing, *_ = ctx.needs_input_grad
        config = ctx.config
        T, H = hidden.shape
        E, K = down.shape[0], indices.shape[1]
        device = hidden.device
        need_pools = need_down or need_up
        # Atomics only when asked for and not ruled out by torch.use_deterministic_algorithms.
        atomic = need_pools and not ctx.deterministic and not _deterministic_algorithms_requested()
        deterministic = need_pools and not atomic

        def workspace(tokens):
            return flash_expert_backward_bytes(tokens, H, E, K, hidden.dtype, deterministic=not atomic,
                                               routing_weights_dtype=routing_weights.dtype).peak  # fmt: skip

        check_fits(workspace(T), device, "the Triton flash_expert backward", per_token=lambda: per_token_bytes(workspace, T))
        grad_out = _unit_stride_rows(grad_out)
        # Saved only with config.sorted_dots: the dots then run in expert order as forward.
        pairs = SortedPairs(order, sorted_experts) if order is not None else None
        grad_pairs, starts, join = pairs, None, lambda: None
        if deterministic and pairs is None:
            grad_pairs, starts, join = _sort_beside(indices, E)

        grad_routing = torch.empty(T, K, device=device, dtype=routing_weights.dtype)
        grad_score = torch.empty(T, K, device=device, dtype=torch.float32)
        coef = torch.empty(T, K, device=device, dtype=torch.float32)
        launch_dots(grad_out, up, indices, routing_weights, scores, coef, grad_score, grad_routing,
                    pairs=pairs, config=config)  # fmt: skip
        grad_hidden = grad_down = grad_up = None
        if need_hidden:
            grad_hidden = torch.empty(T, H, device=device, dtype=hidden.dtype)
            launch_combine(down, indices, grad_score, grad_hidden, config=config)
        if deterministic:
            grad_down = torch.empty(E, H, device=device, dtype=down.dtype) if need_down else None
            grad_up = torch.empty(E, H, device=device, dtype=up.dtype) if need_up else None
            join()
            launch_expert_grads(hidden, grad_out, grad_pairs, grad_score, coef, grad_down, grad_up,
                                starts=starts, config=config)  # fmt: skip
        elif atomic:
            grad_down_acc = torch.zeros(E, H, device=device, dtype=torch.float32) if need_down else None
            grad_up_acc = torch.zeros(E, H, device=device, dtype=torch.float32) if need_up else None
            launch_atomic_expert_grads(hidden, grad_out, indices, grad_score, coef, grad_down_acc, grad_up_acc,
                                       config=config)  # fmt: skip
            grad_down = grad_down_acc.to(down.dtype) if need_down else None
            grad_up = grad_up_acc.to(up.dtype) if need_up else None
        return grad_hidden, grad_down, grad_up, None, grad_routing if need_routing else None, None, None


def _deterministic_algorithms_requested() -> bool:
    """True under ``torch.use_deterministic_algorithms(True)``: the float32-atomic weight
    gradients (``deterministic=False``) then give way to the sorted reduction, with a warning
    (the two compute the same gradients; only the summation order, and so the last bits, differ)."""
    if not torch.are_deterministic_algorithms_enabled():
        return False
    warnings.warn(
        "flash_expert: deterministic=False asks for float32 atomic weight gradients, but "
        "torch.use_deterministic_algorithms(True) is set; using the deterministic sorted reduction instead",
        UserWarning,
        stacklevel=3,
    )
    return True


def flash_expert_triton(
    hidden_states: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    indices: torch.Tensor,
    routing_weights: torch.Tensor,
    deterministic: bool = True,
    config: FlashExpertConfig | None = None,
) -> torch.Tensor:
    """``[T, H]`` flash expert output through the Triton kernels (inputs already validated)."""
    if hidden_states.dtype == torch.float64:
        raise TypeError("the Triton flash_expert kernels support float32/float16/bfloat16, not float64")
    return FlashExpertFunction.apply(
        hidden_states, down_weights, up_weights, indices, routing_weights, deterministic, config
    )
