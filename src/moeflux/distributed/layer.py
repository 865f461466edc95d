"""The expert-parallel MoE layer: functional ``expert_parallel_moe`` and ``ExpertParallelMoE``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from moeflux.backends import resolve_backend
from moeflux.config import MoEConfig, RouterConfig
from moeflux.distributed.exchange import combine, dispatch_start, group_rank_and_size, plan_exchange
from moeflux.distributed.partition import ExpertPartition, ExpertShard
from moeflux.layer import MoEAux, router_logits
from moeflux.ops.experts import run_experts
from moeflux.ops.routing import route
from moeflux.weights import MoEWeights

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def expert_parallel_moe(
    x: torch.Tensor,
    shard: ExpertShard,
    top_k: int,
    *,
    router: RouterConfig = RouterConfig(),
    training: bool = False,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    overlap: bool = True,
) -> tuple[torch.Tensor, MoEAux]:
    """The MoE layer of :func:`moeflux.moe` with its routed experts spread over the ranks of ``group``.

    Collective: every rank of ``group`` calls it (with its own tokens, any number, 0 included).
    Each rank routes its tokens with the whole router, sends every (token, slot) pair with its
    routing weight to the rank owning the expert (:func:`~moeflux.distributed.dispatch`), runs
    the pairs it receives through its routed experts (:func:`moeflux.ops.run_experts`: the same
    Triton kernels as the single-GPU layer), sends the weighted rows back and sums each
    token's rows (:func:`~moeflux.distributed.combine`) plus the shared expert, which every rank
    runs on its own tokens. Per token the output equals the single-GPU layer's.

    With ``overlap`` the shared expert is computed while the dispatch exchange is in flight
    (and its backward while the reverse exchange is), otherwise after it.

    One host sync per call: the exchange's split sizes (:func:`~moeflux.distributed.plan_exchange`).

    Args:
        x: ``[T, H]`` or ``[B, S, H]`` this rank's tokens.
        shard: this rank's weights (:class:`~moeflux.distributed.ExpertShard`), in ``x``'s
            dtype and device; ``shard.expert_bias`` is required exactly when
            ``router.expert_bias`` is on.
        top_k: routed experts per token.
        router: the routing rule (:class:`moeflux.RouterConfig`). A ``capacity_factor`` applies
            to each rank's own tokens (``T`` is the rank's), and dropped pairs are still
            exchanged, with weight 0.
        training: apply the router's training-only input ``jitter``.
        group: the expert-parallel process group (default: the world).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`moeflux.backends`).
        overlap: compute the shared expert while the tokens are in flight.

    Returns:
        ``(out, aux)``: ``out`` has ``x``'s shape and dtype; ``aux`` (:class:`moeflux.MoEAux`)
        describes this rank's tokens as :func:`moeflux.moe` would on them alone: router
        probabilities, choices, ``tokens_per_expert`` of its own pairs, the auxiliary losses
        over its own tokens. Sum ``tokens_per_expert`` over the ranks (``all_reduce``) before
        feeding :class:`moeflux.ExpertBiasUpdater`, so every rank's bias moves alike.
    """
    _check_inputs(x, shard, top_k)
    rank, world_size = group_rank_and_size(group)
    partition = ExpertPartition(shard.num_experts, world_size)
    shard.check(partition, rank)
    backend = resolve_backend(backend, x.device)

    tokens = x.reshape(-1, x.shape[-1])
    logits = router_logits(tokens, shard.router, router, training=training)
    routing = route(logits, top_k, router=router, expert_bias=shard.expert_bias, backend=backend)
    plan = plan_exchange(routing.expert_ids, partition, tokens_per_expert=routing.tokens_per_expert, group=group)

    pending = dispatch_start(tokens, routing.expert_weights, plan)
    shared_out = _shared_experts(tokens, shard, backend) if overlap else None
    recv_x, recv_weights = pending.wait()
    if not overlap:
        shared_out = _shared_experts(tokens, shard, backend)
    expert_out = run_experts(
        recv_x, plan.recv_expert_ids[:, None], recv_weights[:, None], shard.routed_weights(), backend=backend
    )
    out = combine(expert_out, plan, shared_out)
    sequence_length = x.shape[1] if x.dim() == 3 else None
    return out.view(x.shape), MoEAux.from_routing(routing, top_k, router=router, sequence_length=sequence_length)


def _shared_experts(tokens: torch.Tensor, shard: ExpertShard, backend: str) -> torch.Tensor | None:
    """``sum_s SwiGLU_s(x)`` over the shared slices: ``S`` experts every token picks with weight 1."""
    weights = shard.shared_weights()
    if weights is None:
        return None
    num_shared = shard.num_shared_experts
    ids = torch.arange(num_shared, device=tokens.device).expand(tokens.shape[0], num_shared)
    ones = torch.ones(tokens.shape[0], num_shared, device=tokens.device, dtype=torch.float32)
    return run_experts(tokens, ids, ones, weights, backend=backend)


def _check_inputs(x: torch.Tensor, shard: ExpertShard, top_k: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [T, H] or [B, S, H], got shape {list(x.shape)}")
    if x.shape[-1] != shard.hidden_size:
        raise ValueError(f"x has hidden size {x.shape[-1]} but the weights expect {shard.hidden_size}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16 (float64 on 'torch')")
    if x.dtype != shard.gate_up.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weights are {shard.gate_up.dtype}; cast one to match")
    if x.device != shard.gate_up.device:
        raise ValueError(f"x is on {x.device} but the weights are on {shard.gate_up.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= shard.num_experts:
        raise ValueError(f"top_k={top_k!r} must be an int in 1..{shard.num_experts} (the number of routed experts)")


class ExpertParallelMoE(nn.Module):
    """The :class:`moeflux.MoE` layer with its ``E`` routed experts spread over the ranks of
    ``group`` (see :func:`expert_parallel_moe`).

    Parameters on every rank: ``router [E, H]``, ``shared_gate_up [S, H, 2D]`` and
    ``shared_down [S, D, H]``, replicated (:meth:`replicated_parameters`: average or sum their
    gradients over ``group`` as for data parallelism), and this rank's routed experts
    ``gate_up [E_r, H, 2D]``, ``down [E_r, D, H]`` (:meth:`expert_parameters`: their
    gradients already hold every rank's tokens). The experts are split by
    :class:`~moeflux.distributed.ExpertPartition`: contiguous blocks, uneven when ``W`` does
    not divide ``E``.

    ``forward(x)`` returns ``(out, aux)`` as :class:`moeflux.MoE` does, for this rank's tokens.

    Example (on every rank, after ``torch.distributed.init_process_group``):
        >>> config = moeflux.MoEConfig(hidden_size=1024, expert_size=512, num_experts=16, top_k=4,
        ...                            num_shared_experts=1)
        >>> layer = ExpertParallelMoE(config, device="cuda", dtype=torch.bfloat16)  # 16 / W experts here
        >>> out, aux = layer(torch.randn(8, 256, 1024, device="cuda", dtype=torch.bfloat16))
    """

    def __init__(
        self,
        config: MoEConfig,
        group: dist.ProcessGroup | None = None,
        weights: MoEWeights | None = None,
        *,
        backend: str = "auto",
        overlap: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``weights``: the whole layer's packed weights, the same on every rank (each keeps a
        copy of its part). Without them every rank draws random weights and the replicated
        ones are broadcast from the group's first rank (a collective)."""
        super().__init__()
        self.config = config
        self.group = group
        self.backend = backend
        self.overlap = overlap
        self.rank, world_size = group_rank_and_size(group)
        self.partition = ExpertPartition(config.num_experts, world_size)
        broadcast = weights is None
        if weights is None:
            weights = MoEWeights.empty(config, device=device, dtype=dtype).normal_()
        elif (weights.num_experts, weights.num_shared_experts, weights.hidden_size, weights.expert_size) != (
            config.num_experts, config.num_shared_experts, config.hidden_size, config.expert_size
        ):
            raise ValueError(f"weights of shapes {weights.gate_up.shape} do not match {config}")
        shard = ExpertShard.from_weights(weights, self.partition, self.rank)

        def parameter(tensor: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(tensor.detach().to(device=device, dtype=dtype, copy=True))

        self.router = parameter(shard.router)
        self.gate_up = parameter(shard.gate_up)
        self.down = parameter(shard.down)
        self.shared_gate_up = parameter(shard.shared_gate_up)
        self.shared_down = parameter(shard.shared_down)
        self.first_expert = shard.first_expert
        if config.router.expert_bias:
            bias = weights.expert_bias if weights.expert_bias is not None else torch.zeros(config.num_experts)
            self.register_buffer("expert_bias", bias.detach().to(device=device, dtype=torch.float32, copy=True))
        elif weights.expert_bias is not None:
            raise ValueError(
                "the weights carry an expert_bias but config.router.expert_bias is off; turn it on to use it"
            )
        else:
            self.expert_bias = None
        self._shard: ExpertShard | None = None
        if broadcast:
            source = dist.get_global_rank(group, 0) if group is not None else 0
            with torch.no_grad():
                for tensor in self.replicated_parameters():
                    dist.broadcast(tensor, src=source, group=group)
                if self.expert_bias is not None:
                    dist.broadcast(self.expert_bias, src=source, group=group)

    @property
    def shard(self) -> ExpertShard:
        """The parameters as :class:`~moeflux.distributed.ExpertShard`; one object kept across
        calls, so the Triton kernels' address tables are built once."""
        current = (self.router, self.gate_up, self.down, self.shared_gate_up, self.shared_down, self.expert_bias)
        cached = self._shard
        if cached is None or any(a is not b for a, b in zip(_shard_tensors(cached), current)):
            self._shard = ExpertShard(*current[:5], first_expert=self.first_expert, expert_bias=current[5])
        return self._shard

    def replicated_parameters(self) -> Iterator[nn.Parameter]:
        """The router and the shared expert: the same on every rank, each rank's gradient
        from its own tokens only; reduce them over ``group`` as data-parallel parameters."""
        yield from (self.router, self.shared_gate_up, self.shared_down)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """This rank's routed experts: their gradients already include every rank's tokens;
        do not reduce them over ``group``."""
        yield from (self.gate_up, self.down)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        return expert_parallel_moe(
            x,
            self.shard,
            self.config.top_k,
            router=self.config.router,
            training=self.training,
            group=self.group,
            backend=self.backend,
            overlap=self.overlap,
        )

    def extra_repr(self) -> str:
        c = self.config
        experts = self.partition.experts_of(self.rank)
        return (
            f"hidden_size={c.hidden_size}, expert_size={c.expert_size}, num_experts={c.num_experts}, "
            f"top_k={c.top_k}, num_shared_experts={c.num_shared_experts}, rank={self.rank}, "
            f"world_size={self.partition.world_size}, experts={experts.start}..{experts.stop - 1}, "
            f"backend={self.backend!r}"
        )


def _shard_tensors(shard: ExpertShard) -> tuple:
    return (shard.router, shard.gate_up, shard.down, shard.shared_gate_up, shard.shared_down, shard.expert_bias)
