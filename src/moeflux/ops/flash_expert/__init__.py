"""Flash expert: a huge pool of rank-one experts, each token reading only the rows it picks.

Expert ``e`` is a pair of rows ``down[e], up[e]`` of width ``H`` and computes
``silu(x . down[e]) * up[e]``; a token mixes the ``K`` experts its router chose::

    out[t] = sum_j w[t, j] * silu(hidden[t] . down[idx[t, j]]) * up[idx[t, j]]

This is the expert layer of PEER ("Mixture of A Million Experts"). ``flash_expert`` is the
one entry point; ``backend`` picks the plain-PyTorch path (:mod:`.naive`) or the Triton
kernels (:mod:`.triton`). Both accumulate in float32 (float64 for float64 inputs) and return
``hidden``'s dtype.

Cost: the op is memory-bound. The forward reads the ``K`` chosen rows of both pools per token;
the backward reads them again and writes the dense ``[E, H]`` gradients of both pools whole
(zeros for rows nobody picked). Those writes are a floor no kernel can beat: at ``E = 2**20``,
``H = 2048`` in bfloat16 they are 2 x 4 GiB, about 2.8 ms at 3 TB/s, so for very large pools
the backward is bound by ``E`` rather than by ``T K`` (see :mod:`.triton` for the bounds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeflux.backends import resolve_backend
from moeflux.ops.dispatch import check_index_range
from moeflux.ops.flash_expert.naive import flash_expert_torch

if TYPE_CHECKING:
    from moeflux.ops.flash_expert.triton import FlashExpertConfig

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def flash_expert(
    hidden_states: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    indices: torch.Tensor,
    routing_weights: torch.Tensor,
    *,
    check_indices: bool = True,
    backend: str = "auto",
    deterministic: bool = True,
    config: FlashExpertConfig | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * silu(hidden[t] . down[idx[t, j]]) * up[idx[t, j]]``.

    Differentiable in ``hidden_states``, ``down_weights``, ``up_weights`` and
    ``routing_weights``. Rows of the pools that no token picked get exactly zero gradient.

    Args:
        hidden_states: ``[T, H]`` float32 / float16 / bfloat16 (float64 on the torch backend).
        down_weights: ``[E, H]`` in ``hidden_states``' dtype and device.
        up_weights: ``[E, H]`` likewise.
        indices: ``[T, K]`` int64 (or int32) expert ids in ``[0, E)``; repeats are allowed.
        routing_weights: ``[T, K]`` any float dtype (float32 is typical); its gradient comes
            back in that dtype.
        check_indices: verify ``0 <= indices < E`` with one min/max reduction and raise
            ``IndexError`` otherwise. The check copies two numbers to the host, so it
            synchronises the device: turn it off inside CUDA graphs and hot loops whose
            indices are known good (an out-of-range id then reads out of bounds).
        backend: ``"auto"`` (Triton for CUDA tensors, PyTorch otherwise), ``"torch"`` or
            ``"triton"`` (see :mod:`moeflux.backends`). ``"auto"`` keeps float64 on PyTorch.
        deterministic: Triton backend only. ``True`` (default) reduces the weight gradients
            per expert after sorting the (token, slot) pairs by expert id: bitwise
            reproducible. ``False`` adds them with float32 atomics instead: no sort, but the
            summation order and hence the last bits change from run to run, and 16-bit
            pools need two float32 ``[E, H]`` buffers (zeroed, accumulated, converted:
            slower than the sorted path at large E). Under
            ``torch.use_deterministic_algorithms(True)`` ``False`` is overridden: the sorted
            reduction runs and a ``UserWarning`` says so. (The torch backend's gradients go
            through ``index_add``, atomic on CUDA unless deterministic algorithms are on, when
            PyTorch switches to its deterministic version.)
        config: Triton backend only: the kernels' tiles and whether the forward sorts the
            pairs by expert (:class:`moeflux.ops.flash_expert.triton.FlashExpertConfig`);
            ``None`` picks them from ``H``, ``K`` and the dtype.

    Returns:
        ``[T, H]`` in ``hidden_states``' dtype. ``T = 0`` gives an empty ``[0, H]`` tensor.

    Raises:
        torch.OutOfMemoryError: on CUDA, before any launch, when the forward (or later the
            backward) needs more device memory than is free (see :mod:`moeflux.memory`).

    Example:
        >>> x, down, up = torch.randn(4, 16), torch.randn(100, 16), torch.randn(100, 16)
        >>> idx = torch.randint(0, 100, (4, 3))
        >>> w = torch.softmax(torch.randn(4, 3), dim=-1)
        >>> flash_expert(x, down, up, idx, w).shape
        torch.Size([4, 16])
    """
    _check_inputs(hidden_states, down_weights, up_weights, indices, routing_weights)
    if check_indices:
        check_index_range(
            indices, down_weights.shape[0], name="flash_expert: indices", meaning="num_experts = down_weights.shape[0]"
        )
    requested = backend
    backend = resolve_backend(backend, hidden_states.device)
    if backend == "triton" and requested == "auto" and hidden_states.dtype == torch.float64:
        backend = "torch"
    if backend == "torch":
        return flash_expert_torch(hidden_states, down_weights, up_weights, indices, routing_weights)
    from moeflux.ops.flash_expert.triton import flash_expert_triton

    return flash_expert_triton(
        hidden_states, down_weights, up_weights, indices, routing_weights, deterministic, config
    )


def _check_inputs(
    hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, indices: torch.Tensor, routing_weights: torch.Tensor
) -> None:
    named = {
        "hidden_states": hidden,
        "down_weights": down,
        "up_weights": up,
        "indices": indices,
        "routing_weights": routing_weights,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"flash_expert: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"flash_expert: {name} must be 2-D, got shape {list(tensor.shape)}")
    T, H = hidden.shape
    if down.shape[1] != H or up.shape != down.shape:
        raise ValueError(
            f"flash_expert: down_weights and up_weights must both be [E, {H}] (H from hidden_states "
            f"{list(hidden.shape)}), got {list(down.shape)} and {list(up.shape)}"
        )
    if indices.shape[0] != T:
        raise ValueError(f"flash_expert: indices {list(indices.shape)} must be [T, K] with T = {T} tokens")
    if routing_weights.shape != indices.shape:
        raise ValueError(
            f"flash_expert: routing_weights {list(routing_weights.shape)} must match indices {list(indices.shape)}"
        )
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"flash_expert: hidden_states has dtype {hidden.dtype}; supported: {_SUPPORTED_DTYPES}")
    if down.dtype != hidden.dtype or up.dtype != hidden.dtype:
        raise TypeError(
            f"flash_expert: hidden_states, down_weights and up_weights must share a dtype, got "
            f"{hidden.dtype}, {down.dtype} and {up.dtype}"
        )
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"flash_expert: indices must be int64 (or int32), got {indices.dtype}")
    if not routing_weights.is_floating_point():
        raise TypeError(f"flash_expert: routing_weights must be floating point, got {routing_weights.dtype}")
    devices = {name: tensor.device for name, tensor in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"flash_expert: all inputs must be on one device, got {listed}")


__all__ = ["flash_expert"]
