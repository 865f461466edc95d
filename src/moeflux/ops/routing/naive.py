"""Plain-PyTorch routing: the reference the Triton kernel is tested against."""

from __future__ import annotations

import torch


def route_torch(
    logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(router_probs, expert_ids, expert_weights, tokens_per_expert, logsumexp)``."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits_wide = logits.to(compute_dtype)
    router_probs = torch.softmax(logits_wide, dim=-1)
    logsumexp = torch.logsumexp(logits_wide, dim=-1)
    # Rank by the probabilities a model running in the logits' dtype would see.
    scores = router_probs.detach().to(logits.dtype)
    # A stable descending sort ranks equal scores by expert id, lowest first.
    expert_ids = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    expert_weights = router_probs.gather(1, expert_ids)
    if normalize:
        expert_weights = expert_weights / expert_weights.sum(dim=-1, keepdim=True)
    tokens_per_expert = torch.bincount(expert_ids.flatten(), minlength=router_probs.shape[1])
    return router_probs, expert_ids, expert_weights, tokens_per_expert, logsumexp
