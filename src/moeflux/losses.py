"""Auxiliary router losses a trainer adds to its objective.

* :func:`load_balancing_loss`: Switch/GShard, ``E * sum_i f_i * P_i`` over the batch.
* :func:`batch_balance_loss` / :func:`sequence_balance_loss`: DeepSeek-V3's balance loss, whose
  ``P_i`` averages each token's scores normalised to sum to 1 (for sigmoid scores), over the
  batch or per sequence (averaged over the sequences). For softmax probabilities the batch
  form is :func:`load_balancing_loss`.
* :func:`router_z_loss`: ST-MoE's ``mean_t logsumexp(logits_t)^2``.

Each is 1 for perfectly uniform routing (the z-loss aside) and a float32 scalar differentiable
in the router's scores; multiply by a small coefficient (DeepSeek-V3: 1e-4 for the sequence
loss, with the bias update of :class:`moeflux.balancing.ExpertBiasUpdater` doing the rest).
"""

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


def batch_balance_loss(router_scores: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's balance loss over the whole batch: ``E * sum_i f_i * P_i``.

    ``f_i = tokens_per_expert[i] / (T * k)`` as in :func:`load_balancing_loss`;
    ``P_i = mean_t s'_{t, i}`` with ``s'_t = s_t / sum_e s_{t, e}``, each token's scores
    normalised to sum to 1 (sigmoid scores need not; softmax probabilities already do, which
    makes this :func:`load_balancing_loss`). Returns a float32 scalar; 0 when there are no tokens.

    Args:
        router_scores: ``[T, E]`` scores, e.g. :attr:`moeflux.MoEAux.router_probs`.
        tokens_per_expert: ``[E]`` integer counts.
        top_k: experts per token ``k``.
    """
    return load_balancing_loss(_normalised(router_scores), tokens_per_expert, top_k)


def sequence_balance_loss(router_scores: torch.Tensor, expert_ids: torch.Tensor, sequence_length: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences.

    The ``T`` tokens are ``T / L`` sequences of ``L = sequence_length`` consecutive tokens (the
    rows of a ``[B, L, H]`` input). For each sequence, ``E * sum_i f_i * P_i`` with
    ``f_i`` = its (token, slot) pairs on expert ``i`` over ``L * k``, and ``P_i`` = the mean over
    its tokens of the scores normalised per token (as in :func:`batch_balance_loss`). With
    ``sequence_length = T`` this is :func:`batch_balance_loss`. Returns a float32 scalar; 0 when
    there are no tokens.

    Args:
        router_scores: ``[T, E]`` scores.
        expert_ids: ``[T, k]`` chosen experts.
        sequence_length: ``L``, a positive int dividing ``T``.
    """
    num_tokens, num_experts = router_scores.shape
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 1:
        raise ValueError(f"sequence_length must be a positive int, got {sequence_length!r}")
    if num_tokens % sequence_length:
        raise ValueError(f"{num_tokens} tokens are not a whole number of sequences of length {sequence_length}")
    if num_tokens == 0:
        return router_scores.sum()  # an empty sum: 0, still attached to the graph
    num_sequences, top_k = num_tokens // sequence_length, expert_ids.shape[1]
    pairs = expert_ids.reshape(num_sequences, sequence_length * top_k)
    counts = torch.zeros(num_sequences, num_experts, device=pairs.device, dtype=router_scores.dtype)
    counts.scatter_add_(1, pairs, torch.ones_like(pairs, dtype=router_scores.dtype))
    fraction_routed = counts / (sequence_length * top_k)  # [B, E]
    mean_score = _normalised(router_scores).view(num_sequences, sequence_length, num_experts).mean(dim=1)
    return (num_experts * (fraction_routed * mean_score).sum(dim=-1)).mean()


def _normalised(router_scores: torch.Tensor) -> torch.Tensor:
    return router_scores / router_scores.sum(dim=-1, keepdim=True)
