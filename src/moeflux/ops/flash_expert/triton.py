"""Triton flash expert: gathered rank-one experts without materialising the gathered rows.

The op is memory-bound: its bytes are the ``K`` rows each token reads from both pools.

* Forward: one program per token, a ``[BLOCK_K, BLOCK_H]`` tile of its ``K`` chosen rows.
  A first sweep over ``H`` forms the ``K`` scores ``hidden[t] . down[idx]`` in float32; a
  second sweep accumulates ``w * silu(score) * up[idx]`` into the output row. Only the
  float32 scores ``[T, K]`` are saved for the backward.
* Backward, per token (same tiling): ``g = dout[t] . up[idx]`` gives the routing-weight
  gradient and ``d_score``; a second sweep writes ``d_hidden[t] = sum_j d_score_j down[idx_j]``.
* Backward, weight gradients (deterministic default): the ``(token, slot)`` pairs are
  sorted by expert id and one program per expert sums its segment in a fixed order, writing
  every row of ``d_down`` / ``d_up`` (zeros for experts nobody picked). The atomic variant
  instead adds each pair's contribution from the per-token kernel into float32 buffers:
  no sort, but the summation order (hence the rounding) varies from run to run.

Row offsets are ``int64 row * stride`` so pools beyond 2**31 elements address correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements in one gathered tile; bounds registers per program. Tests lower it to make the
# kernels loop over several chunks of H at small shapes.
MAX_TILE_ELEMENTS = 8192
# (token, slot) pairs one step of the weight-gradient reduction reads.
PAIRS_PER_STEP = 16


@triton.jit
def _flash_expert_fwd_kernel(
    hidden_ptr,  # [T, H]
    down_ptr,  # [E, H]
    up_ptr,  # [E, H]
    indices_ptr,  # [T, K] int32 or int64
    routing_weights_ptr,  # [T, K]
    out_ptr,  # [T, H] contiguous, hidden's dtype
    scores_ptr,  # [T, K] float32: hidden . down, saved for the backward
    H,
    K,
    stride_hidden_t,
    stride_down_e,
    stride_up_e,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    o_pair = i_t * K + o_k
    b_expert = tl.load(indices_ptr + o_pair, mask=m_k, other=0).to(tl.int64)  # [BLOCK_K]
    b_weight = tl.load(routing_weights_ptr + o_pair, mask=m_k, other=0.0).to(tl.float32)
    hidden_row = hidden_ptr + i_t * stride_hidden_t
    down_rows = down_ptr + b_expert * stride_down_e  # [BLOCK_K] row starts
    up_rows = up_ptr + b_expert * stride_up_e

    # Elementwise partial products, reduced across H once after the sweep.
    b_products = tl.zeros([BLOCK_K, BLOCK_H], dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_hidden = tl.load(hidden_row + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BLOCK_H]
        b_down = tl.load(down_rows[:, None] + o_h[None, :], mask=m_k[:, None] & m_h[None, :], other=0.0)
        b_products += b_down.to(tl.float32) * b_hidden[None, :]  # [BLOCK_K, BLOCK_H]
    b_score = tl.sum(b_products, axis=1)  # [BLOCK_K]
    tl.store(scores_ptr + o_pair, b_score, mask=m_k)

    # Padded slots have weight 0, so they add nothing below.
    b_coef = b_weight * b_score * tl.sigmoid(b_score)  # [BLOCK_K]
    out_row = out_ptr + i_t * H
    for h_start in range(0, H, BLOCK_H):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_up = tl.load(up_rows[:, None] + o_h[None, :], mask=m_k[:, None] & m_h[None, :], other=0.0)
        b_out = tl.sum(b_coef[:, None] * b_up.to(tl.float32), axis=0)  # [BLOCK_H]
        tl.store(out_row + o_h, b_out.to(out_ptr.dtype.element_ty), mask=m_h)


@triton.jit
def _flash_expert_bwd_tokens_kernel(
    hidden_ptr,  # [T, H]
    down_ptr,  # [E, H]
    up_ptr,  # [E, H]
    indices_ptr,  # [T, K]
    routing_weights_ptr,  # [T, K]
    scores_ptr,  # [T, K] float32, from the forward
    grad_out_ptr,  # [T, H]
    grad_hidden_ptr,  # [T, H] contiguous, hidden's dtype; written when GRAD_HIDDEN
    grad_routing_ptr,  # [T, K] contiguous, routing weights' dtype
    grad_score_ptr,  # [T, K] float32: d loss / d score, read by the weight-gradient kernel
    coef_ptr,  # [T, K] float32: w * silu(score), ditto
    grad_down_acc_ptr,  # [E, H] contiguous float32, zeroed; only with ATOMIC
    grad_up_acc_ptr,  # [E, H] contiguous float32, zeroed; only with ATOMIC
    H,
    K,
    stride_hidden_t,
    stride_down_e,
    stride_up_e,
    stride_grad_out_t,
    GRAD_HIDDEN: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    o_pair = i_t * K + o_k
    b_expert = tl.load(indices_ptr + o_pair, mask=m_k, other=0).to(tl.int64)  # [BLOCK_K]
    b_weight = tl.load(routing_weights_ptr + o_pair, mask=m_k, other=0.0).to(tl.float32)
    b_score = tl.load(scores_ptr + o_pair, mask=m_k, other=0.0)
    hidden_row = hidden_ptr + i_t * stride_hidden_t
    grad_out_row = grad_out_ptr + i_t * stride_grad_out_t
    down_rows = down_ptr + b_expert * stride_down_e
    up_rows = up_ptr + b_expert * stride_up_e

    # g_j = dout[t] . up[idx_j]: how much the loss wants slot j's coefficient to grow.
    b_products = tl.zeros([BLOCK_K, BLOCK_H], dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_grad_out = tl.load(grad_out_row + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BLOCK_H]
        b_up = tl.load(up_rows[:, None] + o_h[None, :], mask=m_k[:, None] & m_h[None, :], other=0.0)
        b_products += b_up.to(tl.float32) * b_grad_out[None, :]  # [BLOCK_K, BLOCK_H]
    b_grad_coef = tl.sum(b_products, axis=1)  # [BLOCK_K]

    b_sigmoid = tl.sigmoid(b_score)
    b_silu = b_score * b_sigmoid
    b_silu_grad = b_sigmoid * (1.0 + b_score * (1.0 - b_sigmoid))
    b_grad_score = b_weight * b_silu_grad * b_grad_coef  # [BLOCK_K]
    b_coef = b_weight * b_silu
    tl.store(grad_routing_ptr + o_pair, (b_silu * b_grad_coef).to(grad_routing_ptr.dtype.element_ty), mask=m_k)
    tl.store(grad_score_ptr + o_pair, b_grad_score, mask=m_k)
    tl.store(coef_ptr + o_pair, b_coef, mask=m_k)

    if GRAD_HIDDEN or ATOMIC:
        for h_start in range(0, H, BLOCK_H):
            o_h = h_start + tl.arange(0, BLOCK_H)
            m_h = o_h < H
            m_kh = m_k[:, None] & m_h[None, :]
            if GRAD_HIDDEN:
                b_down = tl.load(down_rows[:, None] + o_h[None, :], mask=m_kh, other=0.0)
                b_grad_hidden = tl.sum(b_grad_score[:, None] * b_down.to(tl.float32), axis=0)  # [BLOCK_H]
                tl.store(grad_hidden_ptr + i_t * H + o_h, b_grad_hidden.to(grad_hidden_ptr.dtype.element_ty), mask=m_h)
            if ATOMIC:
                b_hidden = tl.load(hidden_row + o_h, mask=m_h, other=0.0).to(tl.float32)
                b_grad_out = tl.load(grad_out_row + o_h, mask=m_h, other=0.0).to(tl.float32)
                o_acc = b_expert[:, None] * H + o_h[None, :]  # [BLOCK_K, BLOCK_H]
                b_grad_down = b_grad_score[:, None] * b_hidden[None, :]
                b_grad_up = b_coef[:, None] * b_grad_out[None, :]
                tl.atomic_add(grad_down_acc_ptr + o_acc, b_grad_down, mask=m_kh, sem="relaxed")
                tl.atomic_add(grad_up_acc_ptr + o_acc, b_grad_up, mask=m_kh, sem="relaxed")


@triton.jit
def _flash_expert_bwd_weights_kernel(
    hidden_ptr,  # [T, H]
    grad_out_ptr,  # [T, H]
    pair_order_ptr,  # [T * K] int64: pair ids (t * K + j) sorted by expert, stable
    expert_starts_ptr,  # [E + 1] int64: expert e owns pair_order[starts[e] : starts[e + 1]]
    grad_score_ptr,  # [T * K] float32
    coef_ptr,  # [T * K] float32
    grad_down_ptr,  # [E, H] contiguous, down's dtype; every row is written
    grad_up_ptr,  # [E, H] contiguous, up's dtype; every row is written
    H,
    K,
    stride_hidden_t,
    stride_grad_out_t,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_e = tl.program_id(0).to(tl.int64)
    segment_start = tl.load(expert_starts_ptr + i_e)
    segment_end = tl.load(expert_starts_ptr + i_e + 1)
    grad_down_row = grad_down_ptr + i_e * H
    grad_up_row = grad_up_ptr + i_e * H
    # H outside, pairs inside: an accumulator of one chunk of the row fits in registers,
    # and the pairs are summed in the same order for every chunk and every run.
    for h_start in range(0, H, BLOCK_H):
        o_h = h_start + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        # Per-lane partial sums over the segment, reduced across pairs once at the end.
        b_grad_down = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
        b_grad_up = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
        for p_start in range(segment_start, segment_end, BLOCK_P):
            o_p = p_start + tl.arange(0, BLOCK_P)
            m_p = o_p < segment_end
            b_pair = tl.load(pair_order_ptr + o_p, mask=m_p, other=0)  # [BLOCK_P]
            b_token = b_pair // K
            b_grad_score = tl.load(grad_score_ptr + b_pair, mask=m_p, other=0.0)
            b_coef = tl.load(coef_ptr + b_pair, mask=m_p, other=0.0)
            m_ph = m_p[:, None] & m_h[None, :]
            b_hidden = tl.load(hidden_ptr + b_token[:, None] * stride_hidden_t + o_h[None, :], mask=m_ph, other=0.0)
            b_grad_out = tl.load(
                grad_out_ptr + b_token[:, None] * stride_grad_out_t + o_h[None, :], mask=m_ph, other=0.0
            )  # [BLOCK_P, BLOCK_H]
            b_grad_down += b_grad_score[:, None] * b_hidden.to(tl.float32)
            b_grad_up += b_coef[:, None] * b_grad_out.to(tl.float32)
        tl.store(grad_down_row + o_h, tl.sum(b_grad_down, axis=0).to(grad_down_ptr.dtype.element_ty), mask=m_h)
        tl.store(grad_up_row + o_h, tl.sum(b_grad_up, axis=0).to(grad_up_ptr.dtype.element_ty), mask=m_h)


def _token_blocks(K: int, H: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_H, num_warps)`` for the per-token kernels: all K slots, as much of H
    as ``MAX_TILE_ELEMENTS`` allows."""
    block_k = max(2, triton.next_power_of_2(K))
    block_h = max(16, min(triton.next_power_of_2(max(H, 1)), MAX_TILE_ELEMENTS // block_k))
    num_warps = 8 if block_k * block_h >= 8192 else 4
    return block_k, block_h, num_warps


def _weight_blocks(H: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_H)`` for the weight-gradient kernel, which holds four pair tiles
    (two loaded, two accumulating)."""
    block_h = max(16, min(triton.next_power_of_2(max(H, 1)), MAX_TILE_ELEMENTS // (4 * PAIRS_PER_STEP)))
    return PAIRS_PER_STEP, block_h


def launch_forward(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    routing_weights: torch.Tensor,
    out: torch.Tensor,
    scores: torch.Tensor,
) -> None:
    """Fill ``out [T, H]`` and ``scores [T, K]`` (both contiguous). ``hidden``, ``down`` and
    ``up`` need unit stride along H; ``indices`` and ``routing_weights`` must be contiguous."""
    T, H = hidden.shape
    K = indices.shape[1]
    if T == 0:
        return
    block_k, block_h, num_warps = _token_blocks(K, H)
    _flash_expert_fwd_kernel[(T,)](
        hidden, down, up, indices, routing_weights, out, scores,
        H, K, hidden.stride(0), down.stride(0), up.stride(0),
        BLOCK_K=block_k, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip


def launch_backward_tokens(
    hidden: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    routing_weights: torch.Tensor,
    scores: torch.Tensor,
    grad_out: torch.Tensor,
    grad_routing: torch.Tensor,
    grad_score: torch.Tensor,
    coef: torch.Tensor,
    grad_hidden: torch.Tensor | None = None,
    grad_down_acc: torch.Tensor | None = None,
    grad_up_acc: torch.Tensor | None = None,
) -> None:
    """Fill ``grad_routing``, ``grad_score``, ``coef`` ``[T, K]``, and ``grad_hidden [T, H]``
    when given. With ``grad_down_acc`` / ``grad_up_acc`` (zeroed float32 ``[E, H]``) it also
    adds the weight gradients into them atomically."""
    T, H = hidden.shape
    K = indices.shape[1]
    if T == 0:
        return
    atomic = grad_down_acc is not None
    if atomic != (grad_up_acc is not None):
        raise ValueError("pass both grad_down_acc and grad_up_acc, or neither")
    block_k, block_h, num_warps = _token_blocks(K, H)
    _flash_expert_bwd_tokens_kernel[(T,)](
        hidden, down, up, indices, routing_weights, scores, grad_out,
        grad_hidden, grad_routing, grad_score, coef, grad_down_acc, grad_up_acc,
        H, K, hidden.stride(0), down.stride(0), up.stride(0), grad_out.stride(0),
        GRAD_HIDDEN=grad_hidden is not None, ATOMIC=atomic,
        BLOCK_K=block_k, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip


def sort_pairs_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pair_order [T*K], expert_starts [E+1])``: pair ids grouped by expert, each group in
    (token, slot) order, and where each expert's group starts."""
    flat = indices.reshape(-1)
    sorted_experts, pair_order = torch.sort(flat, stable=True)
    boundaries = torch.arange(num_experts + 1, device=indices.device, dtype=sorted_experts.dtype)
    expert_starts = torch.searchsorted(sorted_experts, boundaries)
    return pair_order, expert_starts


def launch_backward_weights(
    hidden: torch.Tensor,
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    grad_score: torch.Tensor,
    coef: torch.Tensor,
    grad_down: torch.Tensor,
    grad_up: torch.Tensor,
) -> None:
    """Write every row of ``grad_down`` and ``grad_up`` (contiguous ``[E, H]``) by a
    deterministic per-expert reduction over the pairs that chose it."""
    E, H = grad_down.shape
    K = indices.shape[1]
    if E == 0 or H == 0:
        return
    pair_order, expert_starts = sort_pairs_by_expert(indices, E)
    block_p, block_h = _weight_blocks(H)
    _flash_expert_bwd_weights_kernel[(E,)](
        hidden, grad_out, pair_order, expert_starts, grad_score, coef, grad_down, grad_up,
        H, K, hidden.stride(0), grad_out.stride(0),
        BLOCK_P=block_p, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip


def _unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class FlashExpertFunction(torch.autograd.Function):
    """Autograd over the Triton kernels; saves the inputs and the ``[T, K]`` float32 scores."""

    @staticmethod
    def forward(ctx, hidden, down, up, indices, routing_weights, deterministic: bool):
        hidden, down, up = _unit_stride_rows(hidden), _unit_stride_rows(down), _unit_stride_rows(up)
        indices, routing_weights = indices.contiguous(), routing_weights.contiguous()
        T, H = hidden.shape
        K = indices.shape[1]
        out = torch.empty(T, H, device=hidden.device, dtype=hidden.dtype)
        scores = torch.empty(T, K, device=hidden.device, dtype=torch.float32)
        launch_forward(hidden, down, up, indices, routing_weights, out, scores)
        ctx.save_for_backward(hidden, down, up, indices, routing_weights, scores)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, down, up, indices, routing_weights, scores = ctx.saved_tensors
        need_hidden, need_down, need_up, _, need_routing, _ = ctx.needs_input_grad
        need_weights = need_down or need_up
        grad_out = _unit_stride_rows(grad_out)
        T, H = hidden.shape
        E, K = down.shape[0], indices.shape[1]
        device = hidden.device

        grad_hidden = torch.empty(T, H, device=device, dtype=hidden.dtype) if need_hidden else None
        grad_routing = torch.empty(T, K, device=device, dtype=routing_weights.dtype)
        grad_score = torch.empty(T, K, device=device, dtype=torch.float32)
        coef = torch.empty(T, K, device=device, dtype=torch.float32)
        atomic = need_weights and not ctx.deterministic
        grad_down_acc = torch.zeros(E, H, device=device, dtype=torch.float32) if atomic else None
        grad_up_acc = torch.zeros(E, H, device=device, dtype=torch.float32) if atomic else None
        launch_backward_tokens(
            hidden, down, up, indices, routing_weights, scores, grad_out,
            grad_routing, grad_score, coef, grad_hidden, grad_down_acc, grad_up_acc,
        )  # fmt: skip

        grad_down = grad_up = None
        if atomic:
            grad_down, grad_up = grad_down_acc.to(down.dtype), grad_up_acc.to(up.dtype)
        elif need_weights:
            grad_down = torch.empty(E, H, device=device, dtype=down.dtype)
            grad_up = torch.empty(E, H, device=device, dtype=up.dtype)
            launch_backward_weights(hidden, grad_out, indices, grad_score, coef, grad_down, grad_up)
        return (
            grad_hidden,
            grad_down if need_down else None,
            grad_up if need_up else None,
            None,
            grad_routing if need_routing else None,
            None,
        )


def flash_expert_triton(
    hidden_states: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    indices: torch.Tensor,
    routing_weights: torch.Tensor,
    deterministic: bool = True,
) -> torch.Tensor:
    """``[T, H]`` flash expert output through the Triton kernels (inputs already validated)."""
    if hidden_states.dtype == torch.float64:
        raise TypeError("the Triton flash_expert kernels support float32/float16/bfloat16, not float64")
    return FlashExpertFunction.apply(hidden_states, down_weights, up_weights, indices, routing_weights, deterministic)
