"""Plain-PyTorch routing: the reference the Triton kernel is tested against, and the small
steps both backends share (the weights of the chosen experts, capacity dropping)."""

from __future__ import annotations

import torch

from moeflux.config import RouterConfig

# Normalising the chosen weights divides by their sum plus this (DeepSeek-V3's guard against
# sigmoid scores that all underflow to 0); far below the sum of any non-zero weights.
NORMALIZE_EPS = 1e-20


def sortable(key: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the float ``key``: NaN ranks as ``-inf``, ``-0.0`` as ``+0.0``.

    The sign-magnitude bits of an IEEE float become a two's-complement integer by flipping
    the magnitude bits of negative numbers. Integer keys leave room below ``-inf`` for the
    sentinels of experts that must not be chosen (see :func:`excluded_key`).
    """
    key = torch.where(torch.isnan(key), float("-inf"), key)
    key = torch.where(key == 0, 0.0, key)
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[key.dtype]
    bits = key.contiguous().view(int_dtype)
    return bits ^ ((bits >> (torch.iinfo(int_dtype).bits - 1)) & torch.iinfo(int_dtype).max)


def excluded_key(keys: torch.Tensor) -> int:
    """Below every :func:`sortable` key: an expert outside the kept groups."""
    return torch.iinfo(keys.dtype).min


def route_torch(
    logits: torch.Tensor, top_k: int, router: RouterConfig, expert_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(router_probs, expert_ids, chosen, tokens_per_expert, logsumexp)``.

    ``chosen [T, k]`` holds what the weights are made from (:func:`topk_weights`): the scores
    of the chosen experts, or their logits with ``softmax_after_topk``.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits_wide = logits.to(compute_dtype)
    logsumexp = torch.logsumexp(logits_wide, dim=-1)
    if router.scoring == "sigmoid":
        router_probs = torch.sigmoid(logits_wide)
    else:
        router_probs = torch.softmax(logits_wide, dim=-1)
    if router.softmax_after_topk:
        values = logits_wide
        choice = logits_wide.detach()
    else:
        values = router_probs
        # Rank by the scores a model running in the logits' dtype would see.
        choice = router_probs.detach().to(logits.dtype).to(compute_dtype)
    if expert_bias is not None:
        choice = choice + expert_bias.to(compute_dtype)
    keys = sortable(choice)
    if router.num_groups > 1:
        keys = torch.where(_kept_groups(choice, router), keys, excluded_key(keys))
    # A stable descending sort ranks equal keys by expert id, lowest first.
    expert_ids = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :top_k]
    chosen = values.gather(1, expert_ids)
    tokens_per_expert = torch.bincount(expert_ids.flatten(), minlength=logits.shape[1])
    return router_probs, expert_ids, chosen, tokens_per_expert, logsumexp


def _kept_groups(choice: torch.Tensor, router: RouterConfig) -> torch.Tensor:
    """``[T, E]`` bool: the experts of each token's ``topk_groups`` best groups, a group's
    score being the sum of its two best choice scores (its one score for groups of one)."""
    num_tokens, num_experts = choice.shape
    group_size = num_experts // router.num_groups
    choice = torch.where(torch.isnan(choice), float("-inf"), choice)
    per_group = choice.view(num_tokens, router.num_groups, group_size)
    group_scores = per_group.topk(min(2, group_size), dim=-1).values.sum(dim=-1)  # [T, G]
    best_groups = torch.sort(sortable(group_scores), dim=-1, descending=True, stable=True).indices
    kept = torch.zeros(num_tokens, router.num_groups, dtype=torch.bool, device=choice.device)
    kept.scatter_(1, best_groups[:, : router.topk_groups], True)
    return kept.repeat_interleave(group_size, dim=1)


def topk_weights(chosen: torch.Tensor, router: RouterConfig) -> torch.Tensor:
    """The weights of the chosen experts from their scores (or logits) ``chosen [T, k]``:
    softmax over the chosen logits (``softmax_after_topk``), else the scores; renormalised
    (``normalize_topk``); times ``scaling_factor``. Plain PyTorch, so autograd follows it."""
    if router.softmax_after_topk:
        weights = torch.softmax(chosen, dim=-1)
    elif router.normalize_topk:
        weights = chosen / (chosen.sum(dim=-1, keepdim=True) + NORMALIZE_EPS)
    else:
        weights = chosen
    if router.scaling_factor != 1.0:
        weights = weights * router.scaling_factor
    return weights


def drop_over_capacity(
    expert_ids: torch.Tensor, expert_weights: torch.Tensor, tokens_per_expert: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights of the (token, slot) pairs beyond each expert's ``capacity``.

    An expert keeps its first ``capacity`` pairs in dispatch order (the flat pair index
    ``t * k + j``, i.e. earliest tokens first; the order :mod:`moeflux.ops.dispatch` sorts
    pairs into). Built from a stable sort and the histogram the router already has, with no
    host sync. Returns ``(expert_weights, dropped_per_expert [E] int64)``.
    """
    flat_ids = expert_ids.flatten()
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    counts = tokens_per_expert.to(torch.int64)
    starts = torch.cumsum(counts, dim=0) - counts  # first sorted row of each expert
    rank_sorted = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts[sorted_ids]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # position within its expert
    kept = (rank < capacity).view(expert_ids.shape)
    dropped_per_expert = (counts - capacity).clamp_min(0)
    return torch.where(kept, expert_weights, torch.zeros_like(expert_weights)), dropped_per_expert
