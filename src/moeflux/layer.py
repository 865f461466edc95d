"""The DeepSeek-style MoE layer: functional ``moe`` and the ``MoE`` module."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from moeflux.backends import resolve_backend
from moeflux.config import MoEConfig
from moeflux.losses import load_balancing_loss, router_z_loss
from moeflux.ops.experts import run_experts
from moeflux.ops.routing import Routing, route
from moeflux.weights import MoEWeights

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class MoEAux:
    """What a trainer needs beside the layer's output (``T`` tokens, ``E`` routed experts).

    Attributes:
        router_probs: ``[T, E]`` float32 softmax of the router logits.
        expert_ids: ``[T, k]`` int64 chosen experts, most probable first.
        expert_weights: ``[T, k]`` float32 weights of the chosen experts.
        tokens_per_expert: ``[E]`` int64 (token, slot) pairs per expert.
        load_balancing_loss: scalar, ``E * sum_i f_i * P_i`` (see :func:`moeflux.losses.load_balancing_loss`).
        router_z_loss: scalar, ``mean_t logsumexp(logits_t)^2``.
    """

    router_probs: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    load_balancing_loss: torch.Tensor
    router_z_loss: torch.Tensor

    @classmethod
    def from_routing(cls, routing: Routing, top_k: int) -> "MoEAux":
        """The router's decisions plus both auxiliary losses computed from them."""
        return cls(
            router_probs=routing.router_probs,
            expert_ids=routing.expert_ids,
            expert_weights=routing.expert_weights,
            tokens_per_expert=routing.tokens_per_expert,
            load_balancing_loss=load_balancing_loss(routing.router_probs, routing.tokens_per_expert, top_k),
            router_z_loss=router_z_loss(routing.logsumexp),
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def moe(
    x: torch.Tensor,
    weights: MoEWeights,
    top_k: int,
    *,
    normalize_topk: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, MoEAux]:
    """DeepSeek-style MoE forward.

    ``probs = softmax(x @ W_g.T)``; each token takes its ``top_k`` most probable experts with
    weights ``probs`` (renormalised to sum 1 if ``normalize_topk``); expert ``e`` computes
    ``SwiGLU_e(x) = (silu(x @ W_gate[e]) * (x @ W_up[e])) @ W_down[e]``;
    ``out = sum_j w_j * SwiGLU_{e_j}(x) + SharedSwiGLU(x)``.

    Args:
        x: ``[T, H]`` or ``[B, S, H]``, float32 / float16 / bfloat16 (float64 on the torch backend).
            Non-contiguous inputs are accepted. NaN or Inf in a token propagates to that
            token's output and router probabilities; its expert ids stay in range.
        weights: packed weights in ``x``'s dtype and device (see :class:`moeflux.MoEWeights`).
        top_k: routed experts per token, ``1 <= top_k <= E``.
        normalize_topk: renormalise the chosen weights per token.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`moeflux.backends`).

    Returns:
        ``(out, aux)``: ``out`` has ``x``'s shape and dtype; ``aux`` is a :class:`MoEAux`.

    Example:
        >>> cfg = moeflux.MoEConfig(hidden_size=64, expert_size=32, num_experts=8, top_k=2)
        >>> w = moeflux.MoEWeights.random(cfg)
        >>> out, aux = moeflux.moe(torch.randn(10, 64), w, top_k=2)
    """
    _check_inputs(x, weights, top_k)
    backend = resolve_backend(backend, x.device)
    x_tokens = x.reshape(-1, x.shape[-1])
    logits = F.linear(x_tokens, weights.router)
    routing = route(logits, top_k, normalize=normalize_topk, backend=backend)
    out = run_experts(x_tokens, routing.expert_ids, routing.expert_weights, weights, backend=backend)
    return out.view(x.shape), MoEAux.from_routing(routing, top_k)


def _check_inputs(x: torch.Tensor, weights: MoEWeights, top_k: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    weights.validate()
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [T, H] or [B, S, H], got shape {list(x.shape)}")
    if x.shape[-1] != weights.hidden_size:
        raise ValueError(f"x has hidden size {x.shape[-1]} but the weights expect {weights.hidden_size}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16 (float64 on 'torch')")
    if x.dtype != weights.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weights are {weights.dtype}; cast one to match")
    if x.device != weights.device:
        raise ValueError(f"x is on {x.device} but the weights are on {weights.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= weights.num_experts:
        raise ValueError(f"top_k={top_k!r} must be an int in 1..{weights.num_experts} (the number of routed experts)")


class MoE(nn.Module):
    """DeepSeek-style MoE layer owning its packed weights.

    Parameters (the packed layout of :class:`moeflux.MoEWeights`): ``router [E, H]``,
    ``gate_up [E + S, H, 2D]``, ``down [E + S, D, H]``.

    ``forward(x)`` returns ``(out, aux)`` exactly as :func:`moeflux.moe`.

    Example:
        >>> layer = moeflux.MoE(moeflux.MoEConfig(hidden_size=64, expert_size=32, num_experts=8, top_k=2))
        >>> out, aux = layer(torch.randn(2, 5, 64))
        >>> loss = out.square().mean() + 0.01 * aux.load_balancing_loss
    """

    def __init__(
        self,
        config: MoEConfig,
        weights: MoEWeights | None = None,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Random weights by default; pass packed ``weights`` to wrap them without a copy."""
        super().__init__()
        self.config = config
        self.backend = backend
        if weights is None:
            weights = MoEWeights.empty(config, device=device, dtype=dtype).normal_()
        elif (weights.num_experts, weights.num_shared_experts, weights.hidden_size, weights.expert_size) != (
            config.num_experts, config.num_shared_experts, config.hidden_size, config.expert_size
        ):
            raise ValueError(f"weights of shapes {weights.gate_up.shape} do not match {config}")
        self.router = nn.Parameter(weights.router)
        self.gate_up = nn.Parameter(weights.gate_up)
        self.down = nn.Parameter(weights.down)
        self._weights: MoEWeights | None = None

    def reset_parameters(self) -> None:
        self.weights.normal_()

    @property
    def weights(self) -> MoEWeights:
        """The parameters as :class:`MoEWeights`; one object kept across calls, so the
        address tables the Triton kernels read are built once."""
        cached = self._weights
        current = (self.router, self.gate_up, self.down)
        if cached is None or any(a is not b for a, b in zip((cached.router, cached.gate_up, cached.down), current)):
            self._weights = MoEWeights(router=self.router, gate_up=self.gate_up, down=self.down)
        return self._weights

    @classmethod
    def from_seed_weights(
        cls, weights: dict[str, torch.Tensor], config: MoEConfig | dict, *, backend: str = "auto"
    ) -> "MoE":
        """Build a layer from the competition's weight dict (and its config dict or a MoEConfig)."""
        if not isinstance(config, MoEConfig):
            config = MoEConfig.from_seed_config(config)
        return cls(config, MoEWeights.from_seed_weights(weights, config), backend=backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        return moe(
            x, self.weights, self.config.top_k, normalize_topk=self.config.normalize_topk, backend=self.backend
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden_size={c.hidden_size}, expert_size={c.expert_size}, num_experts={c.num_experts}, "
            f"top_k={c.top_k}, num_shared_experts={c.num_shared_experts}, backend={self.backend!r}"
        )
