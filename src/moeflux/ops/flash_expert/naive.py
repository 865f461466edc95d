"""Plain-PyTorch flash expert: gather the chosen rows of both pools, two einsums.

Differentiable through autograd (``index_select``'s backward scatters the row gradients
with ``index_add``, so rows picked by several tokens accumulate). It materialises the
gathered rows, ``[T, K, H]`` per pool, in the compute dtype: simple, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_expert_torch(
    hidden_states: torch.Tensor,
    down_weights: torch.Tensor,
    up_weights: torch.Tensor,
    indices: torch.Tensor,
    routing_weights: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * silu(hidden[t] . down[idx[t, j]]) * up[idx[t, j]]``, ``[T, H]``."""
    T, H = hidden_states.shape
    K = indices.shape[1]
    compute_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    flat_indices = indices.reshape(-1)
    down_rows = down_weights.index_select(0, flat_indices).view(T, K, H).to(compute_dtype)
    up_rows = up_weights.index_select(0, flat_indices).view(T, K, H).to(compute_dtype)
    scores = torch.einsum("th,tkh->tk", hidden_states.to(compute_dtype), down_rows)
    coef = F.silu(scores) * routing_weights.to(compute_dtype)
    out = torch.einsum("tk,tkh->th", coef, up_rows)
    return out.to(hidden_states.dtype)
