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
    check_ids: bool = False,
    recompute: bool = False,
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
        check_ids: verify ``0 <= expert_ids < E`` and raise ``IndexError`` otherwise, at the
            cost of one host sync. Off by default: :func:`moeflux.moe` passes the router's ids,
            which are always in range, and its forward must stay free of host syncs (CUDA-graph
            capturable). Turn it on for ids from anywhere else: out-of-range ids read and write
            out of bounds on the GPU.
        recompute: on the Triton path with autograd, save no pre-activations and recompute
            them in the backward (:func:`moeflux.ops.experts.autograd.experts_autograd`); no
            effect elsewhere.

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    if x.dim() != 2 or x.shape[1] != weights.hidden_size:
        raise ValueError(f"x must be [T, H={weights.hidden_size}], got shape {list(x.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0] or expert_weights.shape != expert_ids.shape:
        raise ValueError(
            f"expected expert_ids and expert_weights [T={x.shape[0]}, k], got {list(expert_ids.shape)} and "
            f"{list(expert_weights.shape)}"
        )
    if expert_ids.is_floating_point() or expert_ids.is_complex() or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    check_same_device(x=x, expert_ids=expert_ids, expert_weights=expert_weights, weights=weights)
    if check_ids:
        from moeflux.ops.dispatch import check_expert_ids

        check_expert_ids(expert_ids, weights.num_experts)
    if backend == "torch":
        return experts_torch(x, expert_ids, expert_weights, weights.gate_up, weights.down, weights.num_experts)
    if backend == "triton":
        from moeflux.ops.experts.autograd import experts_autograd
        from moeflux.ops.experts.triton import experts_triton_tables

        # Checked above if at all: the kernels' own check would sync the device again.
        tensors = (x, expert_weights, weights.gate_up, weights.down)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return experts_autograd(
                x, expert_ids, expert_weights, weights.gate_up, weights.down, weights.num_experts, check_ids=False,
                recompute=recompute,
            )  # fmt: skip
        return experts_triton_tables(x, expert_ids, expert_weights, weights.expert_tables(), check_ids=False)
    raise ValueError(f"unknown experts backend {backend!r}")


def check_same_device(**named) -> None:
    """Raise ``ValueError`` unless every named tensor (or anything with a ``device``: weights,
    weight tables) is on one device."""
    devices = {name: value.device for name, value in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")
