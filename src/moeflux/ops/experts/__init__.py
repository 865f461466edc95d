"""Routed + shared SwiGLU experts, combined per token by the router weights.

``run_experts`` is the one entry point; the plain-PyTorch path lives in
:mod:`moeflux.ops.experts.naive`, the Triton path in :mod:`moeflux.ops.experts.triton`.
"""

from __future__ import annotations

import torch

from moeflux.ops.experts.naive import experts_torch
from moeflux.weights import MoEWeights


def run_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    weights: MoEWeights,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * SwiGLU_{ids[t, j]}(x[t]) + sum_s SwiGLU_{E + s}(x[t])``.

    Args:
        x: ``[T, H]`` tokens.
        expert_ids: ``[T, k]`` int64 routed expert ids in ``[0, E)``.
        expert_weights: ``[T, k]`` their weights (float32).
        weights: packed layer weights; experts ``E..E+S-1`` are the shared slices.
        backend: ``"torch"`` or ``"triton"``: grouped GEMMs with fused gather, SwiGLU,
            routing weight and scatter (:mod:`moeflux.ops.experts.triton`); when autograd
            needs gradients, the Triton path that saves the pre-activations for its
            backward (:mod:`moeflux.ops.experts.autograd`).

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    if backend == "torch":
        return experts_torch(x, expert_ids, expert_weights, weights.gate_up, weights.down, weights.num_experts)
    if backend == "triton":
        from moeflux.ops.experts.autograd import experts_autograd
        from moeflux.ops.experts.triton import experts_triton_tables

        tensors = (x, expert_weights, weights.gate_up, weights.down)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return experts_autograd(x, expert_ids, expert_weights, weights.gate_up, weights.down, weights.num_experts)
        return experts_triton_tables(x, expert_ids, expert_weights, weights.expert_tables())
    raise ValueError(f"unknown experts backend {backend!r}")
