"""Routing: router logits -> softmax probabilities -> top-k experts -> tokens per expert.

``route`` is the one entry point; ``backend`` picks the plain-PyTorch path
(:mod:`moeflux.ops.routing.naive`) or the fused Triton kernel
(:mod:`moeflux.ops.routing.triton`). Both compute the same function:

* ``router_probs = softmax(logits)`` in float32 (float64 for float64 logits);
* experts are chosen by the probabilities *rounded to the logits' dtype* (what a model
  running in that dtype sees: PyTorch's half-precision softmax returns half), largest first,
  ties broken towards the lower expert id;
* ``expert_weights`` are the float32 probabilities of the chosen experts, renormalised to
  sum to 1 per token only when ``normalize=True``;
* NaN logits make that token's probabilities NaN; its expert ids are still valid ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflux.ops.routing.naive import route_torch


@dataclass
class Routing:
    """What the router decided for ``T`` tokens over ``E`` experts.

    Attributes:
        router_probs: ``[T, E]`` float32, softmax of the logits.
        expert_ids: ``[T, k]`` int64, chosen experts, most probable first.
        expert_weights: ``[T, k]`` float32, their weights.
        tokens_per_expert: ``[E]`` int64, how many (token, slot) pairs chose each expert;
            sums to ``T * k``.
        logsumexp: ``[T]`` float32, ``logsumexp(logits)`` (the router z-loss reads it).
    """

    router_probs: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    logsumexp: torch.Tensor


def route(logits: torch.Tensor, top_k: int, *, normalize: bool = False, backend: str = "torch") -> Routing:
    """Softmax top-k routing of ``logits [T, E]``; differentiable in ``logits``.

    Args:
        logits: ``[T, E]`` router logits, any float dtype.
        top_k: experts per token, ``1 <= top_k <= E``.
        normalize: renormalise the chosen weights to sum to 1 per token.
        backend: ``"torch"`` or ``"triton"``.

    Example:
        >>> r = route(torch.randn(5, 8), top_k=2)
        >>> r.expert_ids.shape, int(r.tokens_per_expert.sum())
        (torch.Size([5, 2]), 10)
    """
    if logits.dim() != 2:
        raise ValueError(f"route expects logits [T, E], got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"route expects floating-point logits, got {logits.dtype}")
    num_experts = logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..{num_experts} (the number of experts)")
    if backend == "torch":
        return Routing(*route_torch(logits, top_k, normalize))
    if backend == "triton":
        from moeflux.ops.routing.triton import route_triton

        return Routing(*route_triton(logits, top_k, normalize))
    raise ValueError(f"unknown routing backend {backend!r}; expected 'torch' or 'triton'")
