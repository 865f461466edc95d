"""``FlashExpert``: a PEER layer, a product-key router over ``n**2`` rank-one experts.

Each head projects a token to a query and splits it into two halves; half ``i`` is scored
against its own codebook of ``n`` sub-keys. Expert ``(i1, i2)``, id ``i1 * n + i2``, scores
``s1[i1] + s2[i2]``, so the ``k`` best experts lie among the ``k x k`` sums of each half's
top ``k``: routing costs ``O(n + k**2)`` per token instead of ``O(n**2)``. The chosen
experts run through :func:`moeflux.ops.flash_expert.flash_expert`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeflux.ops.flash_expert import flash_expert


class FlashExpert(nn.Module):
    """PEER layer: product-key routing into ``num_experts`` rank-one experts.

    Parameters: ``query [num_heads * query_dim, H]`` (a bias-free linear map),
    ``sub_keys [num_heads, 2, n, query_dim / 2]`` with ``n = sqrt(num_experts)``, and the
    expert pools ``down_weights [E, H]``, ``up_weights [E, H]`` shared by all heads.

    Each head picks ``top_k`` experts with weights ``softmax`` over their scores; the
    output sums every head's experts. Routing runs in float32 whatever the parameters' dtype.

    Args:
        hidden_size: ``H``.
        num_experts: ``E``, a perfect square ``n**2``.
        top_k: experts per head, ``1 <= top_k <= E``.
        num_heads: independent routers sharing the pools.
        query_dim: width of a head's query (even); defaults to ``H`` rounded up to even.
        backend: passed to :func:`flash_expert` (``"auto"``, ``"torch"`` or ``"triton"``).

    Example:
        >>> layer = FlashExpert(hidden_size=32, num_experts=64, top_k=4)
        >>> layer(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        num_heads: int = 1,
        query_dim: int | None = None,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts), ("top_k", top_k),
                            ("num_heads", num_heads)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FlashExpert: {name} must be a positive int, got {value!r}")
        num_keys = math.isqrt(num_experts)
        if num_keys * num_keys != num_experts:
            raise ValueError(f"FlashExpert: num_experts={num_experts} must be a perfect square (product keys)")
        if top_k > num_experts:
            raise ValueError(f"FlashExpert: top_k={top_k} exceeds num_experts={num_experts}")
        if query_dim is None:
            query_dim = hidden_size + hidden_size % 2
        if isinstance(query_dim, bool) or not isinstance(query_dim, int) or query_dim < 2 or query_dim % 2:
            raise ValueError(f"FlashExpert: query_dim must be an even int >= 2, got {query_dim!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.num_keys = num_keys
        self.top_k = top_k
        self.num_heads = num_heads
        self.query_dim = query_dim
        self.backend = backend
        factory = {"dtype": dtype, "device": device}
        self.query = nn.Linear(hidden_size, num_heads * query_dim, bias=False, **factory)
        self.sub_keys = nn.Parameter(torch.empty(num_heads, 2, num_keys, query_dim // 2, **factory))
        self.down_weights = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        self.up_weights = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.query.reset_parameters()
        # Unit-variance tokens then give O(1) scores and an O(1) output per head.
        nn.init.normal_(self.sub_keys, std=(self.query_dim // 2) ** -0.5)
        nn.init.normal_(self.down_weights, std=self.hidden_size**-0.5)
        nn.init.normal_(self.up_weights, std=self.hidden_size**-0.5)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, H]`` -> ``(indices [T, heads * top_k] int64, weights [T, heads * top_k] float32)``,
        head by head, each head's experts best first."""
        T = x.shape[0]
        half = self.query_dim // 2
        query = self.query(x).float().view(T, self.num_heads, 2, half)
        half_scores = torch.einsum("thsd,hsnd->thsn", query, self.sub_keys.float())  # [T, heads, 2, n]
        k_half = min(self.top_k, self.num_keys)
        best_half, best_half_ids = half_scores.topk(k_half, dim=-1)  # [T, heads, 2, k_half]
        # Every top_k expert pairs a top_k key of each half, so k_half**2 candidates suffice.
        candidates = best_half[:, :, 0, :, None] + best_half[:, :, 1, None, :]  # [T, heads, k_half, k_half]
        scores, flat = candidates.flatten(-2).topk(self.top_k, dim=-1)  # [T, heads, top_k]
        key_1 = best_half_ids[:, :, 0].gather(-1, flat // k_half)
        key_2 = best_half_ids[:, :, 1].gather(-1, flat % k_half)
        indices = key_1 * self.num_keys + key_2
        weights = torch.softmax(scores, dim=-1)
        return indices.reshape(T, -1), weights.reshape(T, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` or ``[B, S, H]`` -> output of the same shape and dtype."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            H = self.hidden_size
            raise ValueError(f"FlashExpert expects [T, {H}] or [B, S, {H}], got {list(x.shape)}")
        tokens = x.reshape(-1, self.hidden_size)
        indices, weights = self.route(tokens)
        # Product-key ids are in range by construction: skip the host-syncing check.
        out = flash_expert(
            tokens, self.down_weights, self.up_weights, indices, weights, check_indices=False, backend=self.backend
        )
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"num_heads={self.num_heads}, query_dim={self.query_dim}, backend={self.backend!r}"
        )
