"""The DeepSeek-style MoE layer: functional ``moe`` and the ``MoE`` module."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from moeflux.backends import resolve_backend
from moeflux.config import MoEConfig, RouterConfig
from moeflux.losses import batch_balance_loss, load_balancing_loss, router_z_loss, sequence_balance_loss
from moeflux.ops.experts import run_experts
from moeflux.ops.routing import Routing, route
from moeflux.weights import MoEWeights

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class MoEAux:
    """What a trainer needs beside the layer's output (``T`` tokens, ``E`` routed experts).

    The router's decisions are tensors the forward made anyway; the three losses are computed
    on first access (a few small launches each), so a forward whose caller never reads them,
    as in serving, does not pay for them. Each is differentiable in the router weight (read it
    with autograd on, as right after a training forward).

    Attributes:
        router_probs: ``[T, E]`` float32 router scores: the softmax of the router logits, or
            their sigmoid with ``RouterConfig(scoring="sigmoid")`` (see :class:`moeflux.ops.Routing`).
        expert_ids: ``[T, k]`` int64 chosen experts, best first.
        expert_weights: ``[T, k]`` float32 weights of the chosen experts (0 where dropped).
        tokens_per_expert: ``[E]`` int64 (token, slot) pairs per expert, as the router chose
            them (before any capacity drop); what :class:`moeflux.balancing.ExpertBiasUpdater` reads.
        load_balancing_loss: scalar, ``E * sum_i f_i * P_i`` over the batch: Switch's loss
            (:func:`moeflux.losses.load_balancing_loss`) for softmax scores, DeepSeek-V3's
            batch-wise loss (:func:`moeflux.losses.batch_balance_loss`) for sigmoid scores.
        router_z_loss: scalar, ``mean_t logsumexp(logits_t)^2``.
        sequence_balance_loss: scalar, DeepSeek-V3's sequence-wise balance loss
            (:func:`moeflux.losses.sequence_balance_loss`), each row of a ``[B, S, H]`` input a
            sequence (a ``[T, H]`` input is one sequence).
        dropped_per_expert: ``[E]`` int64 pairs dropped by ``RouterConfig.capacity_factor``
            (zeros without it).
    """

    FIELDS = (
        "router_probs", "expert_ids", "expert_weights", "tokens_per_expert", "load_balancing_loss",
        "router_z_loss", "sequence_balance_loss", "dropped_per_expert",
    )  # fmt: skip

    def __init__(
        self, routing: Routing, top_k: int, router: RouterConfig = RouterConfig(), sequence_length: int | None = None
    ) -> None:
        num_tokens = routing.router_probs.shape[0]
        sequence_length = sequence_length or max(num_tokens, 1)
        if num_tokens % sequence_length:  # checked now: a lazy loss must not fail later
            raise ValueError(f"{num_tokens} tokens are not a whole number of sequences of length {sequence_length}")
        self._routing, self._top_k, self._router, self._sequence_length = routing, top_k, router, sequence_length
        self.router_probs = routing.router_probs
        self.expert_ids = routing.expert_ids
        self.expert_weights = routing.expert_weights
        self.tokens_per_expert = routing.tokens_per_expert
        self.dropped_per_expert = routing.dropped_per_expert

    @classmethod
    def from_routing(
        cls,
        routing: Routing,
        top_k: int,
        *,
        router: RouterConfig = RouterConfig(),
        sequence_length: int | None = None,
    ) -> "MoEAux":
        """The router's decisions and, on access, the auxiliary losses computed from them.

        ``sequence_length``: tokens per sequence for :attr:`sequence_balance_loss` (``None``:
        all tokens are one sequence).
        """
        return cls(routing, top_k, router, sequence_length)

    @functools.cached_property
    def load_balancing_loss(self) -> torch.Tensor:
        probs, counts = self.router_probs, self.tokens_per_expert
        if self._router.scoring == "sigmoid":
            return batch_balance_loss(probs, counts, self._top_k)
        return load_balancing_loss(probs, counts, self._top_k)

    @functools.cached_property
    def router_z_loss(self) -> torch.Tensor:
        return router_z_loss(self._routing.logsumexp)

    @functools.cached_property
    def sequence_balance_loss(self) -> torch.Tensor:
        return sequence_balance_loss(self.router_probs, self.expert_ids, self._sequence_length)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every attribute by name (the losses computed now if not yet)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    def __repr__(self) -> str:
        return f"MoEAux(T={self.router_probs.shape[0]}, E={self.router_probs.shape[1]}, k={self.expert_ids.shape[1]})"


def moe(
    x: torch.Tensor,
    weights: MoEWeights,
    top_k: int,
    *,
    router: RouterConfig = RouterConfig(),
    training: bool = False,
    backend: str = "auto",
    recompute: bool = False,
) -> tuple[torch.Tensor, MoEAux]:
    """DeepSeek-style MoE forward.

    ``logits = x @ W_g.T``; the router (:class:`moeflux.RouterConfig`; by default
    ``probs = softmax(logits)``, each token's ``top_k`` most probable experts, weighted by
    ``probs``) picks experts ``e_j`` with weights ``w_j``; expert ``e`` computes
    ``SwiGLU_e(x) = (silu(x @ W_gate[e]) * (x @ W_up[e])) @ W_down[e]``;
    ``out = sum_j w_j * SwiGLU_{e_j}(x) + SharedSwiGLU(x)``.

    Args:
        x: ``[T, H]`` or ``[B, S, H]``, float32 / float16 / bfloat16 (float64 on the torch backend).
            Non-contiguous inputs are accepted. NaN or Inf in a token propagates to that
            token's output and router probabilities; its expert ids stay in range.
        weights: packed weights in ``x``'s dtype and device (see :class:`moeflux.MoEWeights`);
            ``weights.expert_bias`` is required exactly when ``router.expert_bias`` is on.
        top_k: routed experts per token, ``1 <= top_k <= E``.
        router: the routing rule; default: softmax, top-k, no renormalisation.
        training: apply the router's training-only ``jitter`` (the router input alone is
            multiplied by ``U(1 - jitter, 1 + jitter)``; the experts see ``x``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`moeflux.backends`).
        recompute: Triton backend, training: keep no expert pre-activations for the backward,
            which recomputes them (one more gate|up GEMM; activation memory of a few bands
            instead of ``T (k + S) 2D`` elements). See :func:`moeflux.ops.experts.autograd.experts_autograd`.

    Returns:
        ``(out, aux)``: ``out`` has ``x``'s shape and dtype; ``aux`` is a :class:`MoEAux`.

    Example:
        >>> cfg = moeflux.MoEConfig(hidden_size=64, expert_size=32, num_experts=8, top_k=2)
        >>> w = moeflux.MoEWeights.random(cfg)
        >>> out, aux = moeflux.moe(torch.randn(10, 64), w, top_k=2)
        >>> mixtral = moeflux.RouterConfig(normalize_topk=True)
        >>> out, aux = moeflux.moe(torch.randn(10, 64), w, top_k=2, router=mixtral)
    """
    _check_inputs(x, weights, top_k, router)
    backend = resolve_backend(backend, x.device)
    x_tokens = x.reshape(-1, x.shape[-1])
    logits = router_logits(x_tokens, weights.router, router, training=training)
    routing = route(logits, top_k, router=router, expert_bias=weights.expert_bias, backend=backend)
    out = run_experts(x_tokens, routing.expert_ids, routing.expert_weights, weights, backend=backend, recompute=recompute)
    sequence_length = x.shape[1] if x.dim() == 3 else None
    return out.view(x.shape), MoEAux.from_routing(routing, top_k, router=router, sequence_length=sequence_length)


def router_logits(tokens: torch.Tensor, router_weight: torch.Tensor, router: RouterConfig, *, training: bool) -> torch.Tensor:
    """``tokens @ router_weight.T``; in training with ``router.jitter > 0`` the router (only)
    sees the tokens scaled elementwise by ``U(1 - jitter, 1 + jitter)`` noise."""
    if training and router.jitter > 0:
        noise = torch.empty_like(tokens).uniform_(1.0 - router.jitter, 1.0 + router.jitter)
        tokens = tokens * noise
    return F.linear(tokens, router_weight)


def _check_inputs(x: torch.Tensor, weights: MoEWeights, top_k: int, router: RouterConfig) -> None:
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
    if not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a RouterConfig, got {type(router).__name__}")


class MoE(nn.Module):
    """DeepSeek-style MoE layer owning its packed weights.

    Parameters (the packed layout of :class:`moeflux.MoEWeights`): ``router [E, H]``,
    ``gate_up [E + S, H, 2D]``, ``down [E + S, D, H]``. With ``config.router.expert_bias`` on,
    a buffer ``expert_bias [E]`` float32 (zeros unless ``weights`` bring one): saved in the
    state dict, moved by :meth:`to`, never trained by gradients (see
    :class:`moeflux.balancing.ExpertBiasUpdater`).

    ``forward(x)`` returns ``(out, aux)`` exactly as :func:`moeflux.moe` with the config's
    router, ``training=self.training`` (router jitter only in training mode).

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
        recompute: bool = False,
    ) -> None:
        """Random weights by default; pass packed ``weights`` to wrap them without a copy.
        ``recompute``: see :func:`moeflux.moe`."""
        super().__init__()
        self.config = config
        self.backend = backend
        self.recompute = recompute
        if weights is None:
            weights = MoEWeights.empty(config, device=device, dtype=dtype).normal_()
        elif (weights.num_experts, weights.num_shared_experts, weights.hidden_size, weights.expert_size) != (
            config.num_experts, config.num_shared_experts, config.hidden_size, config.expert_size
        ):
            raise ValueError(f"weights of shapes {weights.gate_up.shape} do not match {config}")
        self.router = nn.Parameter(weights.router)
        self.gate_up = nn.Parameter(weights.gate_up)
        self.down = nn.Parameter(weights.down)
        if config.router.expert_bias:
            bias = weights.expert_bias
            if bias is None:
                bias = torch.zeros(config.num_experts, device=weights.device, dtype=torch.float32)
            self.register_buffer("expert_bias", bias)
        elif weights.expert_bias is not None:
            raise ValueError("the weights carry an expert_bias but config.router.expert_bias is off; turn it on to use it")
        else:
            self.expert_bias = None
        self._weights: MoEWeights | None = None

    def reset_parameters(self) -> None:
        """Fresh random weights (:meth:`MoEWeights.normal_`) and a zero ``expert_bias``."""
        self.weights.normal_()
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    @property
    def weights(self) -> MoEWeights:
        """The parameters as :class:`MoEWeights`; one object kept across calls, so the
        address tables the Triton kernels read are built once."""
        cached = self._weights
        current = (self.router, self.gate_up, self.down, self.expert_bias)
        if cached is None or any(
            a is not b for a, b in zip((cached.router, cached.gate_up, cached.down, cached.expert_bias), current)
        ):
            self._weights = MoEWeights(*current)
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
            x, self.weights, self.config.top_k, router=self.config.router, training=self.training, backend=self.backend,
            recompute=self.recompute,
        )  # fmt: skip

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden_size={c.hidden_size}, expert_size={c.expert_size}, num_experts={c.num_experts}, "
            f"top_k={c.top_k}, num_shared_experts={c.num_shared_experts}, backend={self.backend!r}"
            + (", recompute=True" if self.recompute else "")
            + ("" if c.router == RouterConfig() else f", router={c.router}")
        )
