"""Auxiliary router losses a trainer adds to its objective."""

from __future__ import annotations

import torch


def load_balancing_loss(router_probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``f_i = tokens_per_expert[i] / (T * k)`` is the fraction of (token, slot) pairs sent to
    expert ``i`` (a count: no gradient); ``P_i = mean_t router_probs[t, i]`` is the mean router
    probability of ``i`` (differentiable). It equals 1 when routing is perfectly uniform.
    Returns a float32 scalar; 0 when there are no tokens.

    Args:
        router_probs: ``[T, E]`` softmax probabilities.
        tokens_per_expert: ``[E]`` integer counts.
        top_k: experts per token ``k``.
    """
    num_tokens, num_experts = router_probs.shape
    if num_tokens == 0:
        return router_probs.sum()  # an empty sum: 0, still attached to the graph
    fraction_routed = tokens_per_expert.to(router_probs.dtype) / (num_tokens * top_k)
    mean_prob = router_probs.mean(dim=0)
    return num_experts * (fraction_routed * mean_prob).sum()


def router_z_loss(logsumexp: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE); 0 when there are no tokens.

    Args:
        logsumexp: ``[T]`` ``logsumexp`` of each token's router logits.
    """
    if logsumexp.numel() == 0:
        return logsumexp.sum()  # an empty sum: 0, still attached to the graph
    return logsumexp.square().mean()
