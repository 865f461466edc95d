"""Fused routing kernel: scores, top-k, per-expert histogram and logsumexp in one pass.

One program owns ``BLOCK_T`` tokens and all ``E`` experts of each (``E`` is padded to a
power of two and masked), so each logit is read once and nothing is sorted globally.
The routing variants of :class:`moeflux.RouterConfig` are constexpr switches of this one
kernel (sigmoid scores, ranking by the logits, correction bias, expert groups). It writes
the chosen experts' raw scores (or logits); the weights made from them (softmax over the
chosen, renormalisation, scaling) are a few PyTorch ops shared with the torch path
(:func:`moeflux.ops.routing.naive.topk_weights`), and so is the backward's tail: the
backward here is the scores' Jacobian and the logsumexp's.

Ranking uses integer keys (:func:`_sortable`, as :func:`moeflux.ops.routing.naive.sortable`):
every float, ``-inf`` included, maps above the sentinels of experts that may not be chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflux.config import RouterConfig

# Integer keys below every real (sortable) key, -inf included (which maps to -2**31 + 2**23 - 1).
_KEY_EXCLUDED = tl.constexpr(-(2**31) + 2)  # outside the token's kept groups
_KEY_PADDING = tl.constexpr(-(2**31) + 1)  # lanes past E
_KEY_TAKEN = tl.constexpr(-(2**31))  # already chosen


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
def _sortable(b_x):
    """float32 -> int32 keys in the same order; NaN ranks as -inf, -0.0 as +0.0."""
    b_x = tl.where(b_x == b_x, b_x, float("-inf"))
    b_x = tl.where(b_x == 0.0, 0.0, b_x)
    b_bits = b_x.to(tl.int32, bitcast=True)
    return b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _kept_groups(
    b_choice,  # [BLOCK_T, BLOCK_E] float32 choice scores
    o_e,
    m_e,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """``[BLOCK_T, BLOCK_E]`` bool: the experts of each token's ``TOPK_GROUPS`` best groups, a
    group's score being the sum of its two best choice scores (its one score for groups of one)."""
    b_choice = tl.where(b_choice == b_choice, b_choice, float("-inf"))
    b_group_of = o_e // GROUP_SIZE  # [BLOCK_E]
    o_g = tl.arange(0, BLOCK_G)
    b_group_score = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
    for g in tl.static_range(NUM_GROUPS):
        b_in = tl.where(((b_group_of == g) & m_e)[None, :], b_choice, float("-inf"))
        b_best = tl.max(b_in, axis=1)  # [BLOCK_T]
        if GROUP_SIZE > 1:
            i_best = tl.argmax(b_in, axis=1, tie_break_left=True)
            b_best = b_best + tl.max(tl.where(o_e[None, :] == i_best[:, None], float("-inf"), b_in), axis=1)
        b_group_score = tl.where(o_g[None, :] == g, b_best[:, None], b_group_score)
    b_group_key = tl.where((o_g < NUM_GROUPS)[None, :], _sortable(b_group_score), _KEY_PADDING)
    b_kept = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUPS):
        i_group = tl.argmax(b_group_key, axis=1, tie_break_left=True)  # [BLOCK_T], lowest id among ties
        b_kept = b_kept | (b_group_of[None, :] == i_group[:, None])
        b_group_key = tl.where(o_g[None, :] == i_group[:, None], _KEY_TAKEN, b_group_key)
    return b_kept


@triton.jit
def _routing_kernel(
    logits_ptr,  # [T, E], any float dtype
    expert_bias_ptr,  # [E] float32 (read when HAS_BIAS)
    probs_ptr,  # [T, E] float32 scores
    expert_ids_ptr,  # [T, TOP_K] int64
    chosen_ptr,  # [T, TOP_K] float32 scores (or logits, RANK_BY_LOGITS) of the chosen experts
    tokens_per_expert_ptr,  # [E] int32, zeroed by the launcher
    logsumexp_ptr,  # [T] float32
    T,
    E,
    stride_logits_t,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RANK_BY_LOGITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
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
    tl.store(logsumexp_ptr + o_t, b_max + tl.log(b_sum), mask=m_t)
    if SIGMOID:
        b_probs = 1.0 / (1.0 + tl.exp(-b_logits_f32))  # [BLOCK_T, BLOCK_E]
    else:
        b_probs = b_exp / b_sum[:, None]
    tl.store(probs_ptr + o_t[:, None].to(tl.int64) * E + o_e[None, :], b_probs, mask=m_te)

    if RANK_BY_LOGITS:
        b_values = b_logits_f32
        b_choice = b_logits_f32
    else:
        b_values = b_probs
        # Rank by the scores rounded to the logits' dtype, as the torch path does.
        b_choice = _round_like(b_probs, b_logits.dtype)
    if HAS_BIAS:
        b_choice = b_choice + tl.load(expert_bias_ptr + o_e, mask=m_e, other=0.0)[None, :]
    b_key = _sortable(b_choice)
    if NUM_GROUPS > 1:
        b_kept = _kept_groups(b_choice, o_e, m_e, NUM_GROUPS, TOPK_GROUPS, GROUP_SIZE, BLOCK_T, BLOCK_E, BLOCK_G)
        b_key = tl.where(b_kept, b_key, _KEY_EXCLUDED)
    b_key = tl.where(m_e[None, :], b_key, _KEY_PADDING)
    for j in range(TOP_K):
        b_id = tl.argmax(b_key, axis=1, tie_break_left=True)  # [BLOCK_T], lowest id among ties
        b_hit = o_e[None, :] == b_id[:, None]
        b_value = tl.sum(tl.where(b_hit, b_values, 0.0), axis=1)
        o_slot = o_t.to(tl.int64) * TOP_K + j
        tl.store(expert_ids_ptr + o_slot, b_id.to(tl.int64), mask=m_t)
        tl.store(chosen_ptr + o_slot, b_value, mask=m_t)
        tl.atomic_add(tokens_per_expert_ptr + b_id, tl.full([BLOCK_T], 1, tl.int32), mask=m_t)
        b_key = tl.where(b_hit, _KEY_TAKEN, b_key)


def _launch_routing(logits: torch.Tensor, top_k: int, router: RouterConfig, expert_bias: torch.Tensor | None):
    T, E = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    router_probs = torch.empty(T, E, device=device, dtype=torch.float32)
    expert_ids = torch.empty(T, top_k, device=device, dtype=torch.int64)
    chosen = torch.empty(T, top_k, device=device, dtype=torch.float32)
    tokens_per_expert = torch.zeros(E, device=device, dtype=torch.int32)
    logsumexp = torch.empty(T, device=device, dtype=torch.float32)
    if T > 0:
        block_e = max(16, triton.next_power_of_2(E))
        block_t = max(1, min(64, 4096 // block_e))
        grid = (triton.cdiv(T, block_t),)
        _routing_kernel[grid](
            logits, logits if expert_bias is None else expert_bias.contiguous(),
            router_probs, expert_ids, chosen, tokens_per_expert, logsumexp,
            T, E, logits.stride(0),
            TOP_K=top_k, SIGMOID=router.scoring == "sigmoid", RANK_BY_LOGITS=router.softmax_after_topk,
            HAS_BIAS=expert_bias is not None, NUM_GROUPS=router.num_groups, TOPK_GROUPS=router.topk_groups,
            GROUP_SIZE=E // router.num_groups, BLOCK_T=block_t, BLOCK_E=block_e,
            BLOCK_G=triton.next_power_of_2(router.num_groups),
        )  # fmt: skip
    return router_probs, expert_ids, chosen, tokens_per_expert.to(torch.int64), logsumexp


class RoutingFunction(torch.autograd.Function):
    """Autograd over the fused kernel: gradients reach the logits through the scores, the
    chosen experts' scores (or logits) and the logsumexp."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int, router: RouterConfig, expert_bias: torch.Tensor | None):
        router_probs, expert_ids, chosen, tokens_per_expert, logsumexp = _launch_routing(
            logits, top_k, router, expert_bias
        )
        # Sigmoid scores: the logsumexp's gradient needs the softmax, rebuilt from the logits.
        ctx.save_for_backward(router_probs, expert_ids, logsumexp, logits if router.scoring == "sigmoid" else None)
        ctx.router = router
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(expert_ids, tokens_per_expert)
        return router_probs, expert_ids, chosen, tokens_per_expert, logsumexp

    @staticmethod
    def backward(ctx, grad_probs, _grad_ids, grad_chosen, _grad_counts, grad_logsumexp):
        router_probs, expert_ids, logsumexp, logits = ctx.saved_tensors
        router = ctx.router
        grad_scores = torch.zeros_like(router_probs) if grad_probs is None else grad_probs.float().clone()
        if grad_chosen is not None and not router.softmax_after_topk:
            grad_scores.scatter_add_(1, expert_ids, grad_chosen.float())
        if router.scoring == "sigmoid":
            # d sigmoid(z) / dz = s (1 - s)
            grad_logits = router_probs * (1.0 - router_probs) * grad_scores
            softmax = torch.exp(logits.float() - logsumexp[:, None])
        else:
            # softmax Jacobian: dL/dlogit = p * (g - <g, p>)
            grad_logits = router_probs * (grad_scores - (grad_scores * router_probs).sum(-1, keepdim=True))
            softmax = router_probs
        if grad_chosen is not None and router.softmax_after_topk:
            grad_logits.scatter_add_(1, expert_ids, grad_chosen.float())
        if grad_logsumexp is not None:
            grad_logits = grad_logits + softmax * grad_logsumexp.float()[:, None]  # d logsumexp / d logit = softmax
        return grad_logits.to(ctx.logits_dtype), None, None, None


def route_triton(logits: torch.Tensor, top_k: int, router: RouterConfig, expert_bias: torch.Tensor | None):
    """Returns ``(router_probs, expert_ids, chosen, tokens_per_expert, logsumexp)``, as
    :func:`moeflux.ops.routing.naive.route_torch`."""
    if logits.dtype == torch.float64:
        raise TypeError("the Triton routing kernel supports float32/float16/bfloat16 logits, not float64")
    return RoutingFunction.apply(logits, top_k, router, expert_bias)
