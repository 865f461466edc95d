"""Fused routing kernel: softmax, top-k, per-expert histogram and logsumexp in one pass.

One program owns ``BLOCK_T`` tokens and all ``E`` experts of each (``E`` is padded to a
power of two and masked), so each logit is read once and nothing is sorted globally.
The backward (softmax Jacobian, renormalisation, logsumexp) is a few small PyTorch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Keys for the top-k search: probabilities lie in [0, 1], so these sentinels rank below
# every real expert. NaN probabilities rank above padding, so ids stay in [0, E).
_KEY_NAN = tl.constexpr(-1.0)
_KEY_PADDING = tl.constexpr(-2.0)
_KEY_TAKEN = tl.constexpr(-3.0)


@triton.jit
def _round_like(b_x, dtype: tl.constexpr):
    """float32 ``b_x`` rounded to ``dtype`` (nearest, ties to even) and widened back."""
    if dtype == tl.bfloat16:
        # By hand: Triton's interpreter truncates float32 -> bfloat16 casts.
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
        return b_bits.to(tl.float32, bitcast=True)
    else:
        return b_x.to(dtype).to(tl.float32)


@triton.jit
def _routing_kernel(
    logits_ptr,  # [T, E], any float dtype
    probs_ptr,  # [T, E] float32
    expert_ids_ptr,  # [T, TOP_K] int64
    expert_weights_ptr,  # [T, TOP_K] float32
    tokens_per_expert_ptr,  # [E] int32, zeroed by the launcher
    logsumexp_ptr,  # [T] float32
    T,
    E,
    stride_logits_t,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_e = tl.arange(0, BLOCK_E)
    m_t = o_t < T
    m_e = o_e < E
    m_te = m_t[:, None] & m_e[None, :]

    b_logits = tl.load(
        logits_ptr + o_t[:, None].to(tl.int64) * stride_logits_t + o_e[None, :], mask=m_te, other=float("-inf")
    )
    b_logits_f32 = b_logits.to(tl.float32)
    b_max = tl.max(b_logits_f32, axis=1)  # [BLOCK_T]
    b_exp = tl.exp(b_logits_f32 - b_max[:, None])
    b_sum = tl.sum(b_exp, axis=1)
    b_probs = b_exp / b_sum[:, None]  # [BLOCK_T, BLOCK_E]
    tl.store(probs_ptr + o_t[:, None].to(tl.int64) * E + o_e[None, :], b_probs, mask=m_te)
    tl.store(logsumexp_ptr + o_t, b_max + tl.log(b_sum), mask=m_t)

    # Rank by the probabilities rounded to the logits' dtype, as the torch path does.
    b_key = _round_like(b_probs, b_logits.dtype)
    b_key = tl.where(b_key == b_key, b_key, _KEY_NAN)
    b_key = tl.where(m_e[None, :], b_key, _KEY_PADDING)
    for j in range(TOP_K):
        b_id = tl.argmax(b_key, axis=1, tie_break_left=True)  # [BLOCK_T], lowest id among ties
        b_hit = o_e[None, :] == b_id[:, None]
        b_weight = tl.sum(tl.where(b_hit, b_probs, 0.0), axis=1)
        o_slot = o_t.to(tl.int64) * TOP_K + j
        tl.store(expert_ids_ptr + o_slot, b_id.to(tl.int64), mask=m_t)
        tl.store(expert_weights_ptr + o_slot, b_weight, mask=m_t)
        tl.atomic_add(tokens_per_expert_ptr + b_id, tl.full([BLOCK_T], 1, tl.int32), mask=m_t)
        b_key = tl.where(b_hit, _KEY_TAKEN, b_key)


def _launch_routing(logits: torch.Tensor, top_k: int):
    T, E = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    router_probs = torch.empty(T, E, device=device, dtype=torch.float32)
    expert_ids = torch.empty(T, top_k, device=device, dtype=torch.int64)
    expert_weights = torch.empty(T, top_k, device=device, dtype=torch.float32)
    tokens_per_expert = torch.zeros(E, device=device, dtype=torch.int32)
    logsumexp = torch.empty(T, device=device, dtype=torch.float32)
    if T > 0:
        block_e = max(16, triton.next_power_of_2(E))
        block_t = max(1, min(64, 4096 // block_e))
        grid = (triton.cdiv(T, block_t),)
        _routing_kernel[grid](
            logits, router_probs, expert_ids, expert_weights, tokens_per_expert, logsumexp,
            T, E, logits.stride(0),
            TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e,
        )  # fmt: skip
    return router_probs, expert_ids, expert_weights, tokens_per_expert.to(torch.int64), logsumexp


class RoutingFunction(torch.autograd.Function):
    """Autograd over the fused kernel: gradients reach the logits through the router
    probabilities, the chosen weights (with renormalisation) and the logsumexp."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int, normalize: bool):
        router_probs, expert_ids, raw_weights, tokens_per_expert, logsumexp = _launch_routing(logits, top_k)
        weight_sum = raw_weights.sum(dim=-1, keepdim=True)
        expert_weights = raw_weights / weight_sum if normalize else raw_weights
        ctx.save_for_backward(router_probs, expert_ids, expert_weights, weight_sum)
        ctx.normalize = normalize
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(expert_ids, tokens_per_expert)
        return router_probs, expert_ids, expert_weights, tokens_per_expert, logsumexp

    @staticmethod
    def backward(ctx, grad_probs, _grad_ids, grad_weights, _grad_counts, grad_logsumexp):
        router_probs, expert_ids, expert_weights, weight_sum = ctx.saved_tensors
        grad_total = torch.zeros_like(router_probs) if grad_probs is None else grad_probs.float().clone()
        if grad_weights is not None:
            grad_weights = grad_weights.float()
            if ctx.normalize:
                # w_j = p_j / s  =>  dL/dp_j = (g_j - sum_i g_i w_i) / s
                grad_weights = (grad_weights - (grad_weights * expert_weights).sum(-1, keepdim=True)) / weight_sum
            grad_total.scatter_add_(1, expert_ids, grad_weights)
        # softmax Jacobian: dL/dlogit = p * (g - <g, p>); d logsumexp / d logit = p
        grad_logits = router_probs * (grad_total - (grad_total * router_probs).sum(-1, keepdim=True))
        if grad_logsumexp is not None:
            grad_logits = grad_logits + router_probs * grad_logsumexp.float()[:, None]
        return grad_logits.to(ctx.logits_dtype), None, None


def route_triton(logits: torch.Tensor, top_k: int, normalize: bool):
    """Returns ``(router_probs, expert_ids, expert_weights, tokens_per_expert, logsumexp)``."""
    if logits.dtype == torch.float64:
        raise TypeError("the Triton routing kernel supports float32/float16/bfloat16 logits, not float64")
    return RoutingFunction.apply(logits, top_k, normalize)
