"""Routing: router logits -> scores -> top-k experts and their weights -> tokens per expert.

``route`` is the one entry point; ``backend`` picks the plain-PyTorch path
(:mod:`moeflux.ops.routing.naive`) or the fused Triton kernel
(:mod:`moeflux.ops.routing.triton`). Both compute the same function of the logits, the
rule set by :class:`moeflux.RouterConfig` (softmax or sigmoid scores, correction bias,
group-limited top-k, renormalisation, scaling, softmax after top-k, capacity):

* ``router_probs = softmax(logits)`` or ``sigmoid(logits)`` in float32 (float64 for
  float64 logits);
* experts are ranked by their choice scores: the scores *rounded to the logits' dtype* (what
  a model running in that dtype sees: PyTorch's half-precision softmax returns half), or the
  logits with ``softmax_after_topk``, plus the float32 ``expert_bias`` when there is one;
  largest first, ties broken towards the lower expert id (and the lower group id);
* NaN logits make that token's probabilities NaN; its expert ids are still valid ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflux.config import RouterConfig
from moeflux.ops.routing.naive import drop_over_capacity, route_torch, topk_weights


@dataclass
class Routing:
    """What the router decided for ``T`` tokens over ``E`` experts.

    Attributes:
        router_probs: ``[T, E]`` float32, the router's scores of every expert:
            ``softmax(logits)``, or with ``scoring="sigmoid"`` the un-biased
            ``sigmoid(logits)`` (which need not sum to 1: the balance losses normalise them
            per token). Differentiable; the auxiliary losses read it.
        expert_ids: ``[T, k]`` int64, chosen experts, best first.
        expert_weights: ``[T, k]`` float32, their weights (0 for pairs dropped by the capacity).
        tokens_per_expert: ``[E]`` int64, how many (token, slot) pairs chose each expert
            (before any capacity drop); sums to ``T * k``.
        logsumexp: ``[T]`` float32, ``logsumexp(logits)`` (the router z-loss reads it).
        dropped_per_expert: ``[E]`` int64, pairs over each expert's capacity, whose weight is
            0; zeros without a ``capacity_factor``. Kept pairs: ``tokens_per_expert - dropped_per_expert``.
    """

    router_probs: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    logsumexp: torch.Tensor
    dropped_per_expert: torch.Tensor


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    router: RouterConfig = RouterConfig(),
    expert_bias: torch.Tensor | None = None,
    backend: str = "torch",
) -> Routing:
    """Top-k routing of ``logits [T, E]`` by the rule ``router``; differentiable in ``logits``.

    Neither backend syncs with the host (capacity dropping included).

    Args:
        logits: ``[T, E]`` router logits, any float dtype.
        top_k: experts per token, ``1 <= top_k <= E`` (and no more than the experts of the
            kept groups).
        router: the routing rule (:class:`moeflux.RouterConfig`); default: softmax top-k.
        expert_bias: ``[E]`` float32 correction bias on the logits' device, added to the
            choice scores only; required exactly when ``router.expert_bias`` is on.
        backend: ``"torch"`` or ``"triton"``.

    Example:
        >>> r = route(torch.randn(5, 8), top_k=2)
        >>> r.expert_ids.shape, int(r.tokens_per_expert.sum())
        (torch.Size([5, 2]), 10)
        >>> deepseek = RouterConfig(scoring="sigmoid", expert_bias=True, num_groups=4, topk_groups=2,
        ...                         normalize_topk=True, scaling_factor=2.5)
        >>> r = route(torch.randn(5, 8), 2, router=deepseek, expert_bias=torch.zeros(8))
    """
    if logits.dim() != 2:
        raise ValueError(f"route expects logits [T, E], got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"route expects floating-point logits, got {logits.dtype}")
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..{num_experts} (the number of experts)")
    if not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a RouterConfig, got {type(router).__name__}")
    router.validate(num_experts, top_k)
    check_expert_bias(expert_bias, router, num_experts, logits.device)
    if backend == "torch":
        router_probs, expert_ids, chosen, tokens_per_expert, logsumexp = route_torch(
            logits, top_k, router, expert_bias
        )
    elif backend == "triton":
        from moeflux.ops.routing.triton import route_triton

        router_probs, expert_ids, chosen, tokens_per_expert, logsumexp = route_triton(
            logits, top_k, router, expert_bias
        )
    else:
        raise ValueError(f"unknown routing backend {backend!r}; expected 'torch' or 'triton'")
    expert_weights = topk_weights(chosen, router)
    capacity = router.capacity(num_tokens, num_experts, top_k)
    if capacity is None:
        dropped_per_expert = torch.zeros_like(tokens_per_expert)
    else:
        expert_weights, dropped_per_expert = drop_over_capacity(
            expert_ids, expert_weights, tokens_per_expert, capacity
        )
    return Routing(router_probs, expert_ids, expert_weights, tokens_per_expert, logsumexp, dropped_per_expert)


def check_expert_bias(
    expert_bias: torch.Tensor | None, router: RouterConfig, num_experts: int, device: torch.device
) -> None:
    """Raise unless ``expert_bias`` is given exactly when ``router.expert_bias`` is on, as a
    float32 ``[E]`` tensor on ``device``."""
    if expert_bias is None:
        if router.expert_bias:
            raise ValueError("router.expert_bias is on but no expert_bias tensor was given")
        return
    if not router.expert_bias:
        raise ValueError("an expert_bias tensor was given but router.expert_bias is off; turn it on to use it")
    if not isinstance(expert_bias, torch.Tensor):
        raise TypeError(f"expert_bias must be a torch.Tensor, got {type(expert_bias).__name__}")
    if expert_bias.dtype != torch.float32 or tuple(expert_bias.shape) != (num_experts,):
        raise ValueError(
            f"expert_bias must be float32 [{num_experts}] (one per routed expert), got {expert_bias.dtype} "
            f"{list(expert_bias.shape)}"
        )
    if expert_bias.device != device:
        raise ValueError(f"expert_bias is on {expert_bias.device} but the logits are on {device}")
