"""Which rank owns which routed experts, and the weights one rank holds.

``E`` routed experts over ``W`` ranks: contiguous blocks of ids, the first ``E % W`` ranks one
expert more than the others (``E = 10, W = 4``: ranks own 3, 3, 2, 2 experts, ids ``0-2``,
``3-5``, ``6-7``, ``8-9``). Uneven splits are supported; a rank never owns zero experts, so
``E >= W``. The router and the shared expert are replicated on every rank (data-parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeflux.weights import MoEWeights


@dataclass(frozen=True)
class ExpertPartition:
    """``num_experts`` routed experts split into contiguous blocks over ``world_size`` ranks.

    Invariants: ``offsets[0] = 0``, ``offsets[W] = E``, rank ``r`` owns global ids
    ``offsets[r] .. offsets[r + 1] - 1``, and ``sizes[r] = offsets[r + 1] - offsets[r]`` is
    ``E // W + 1`` for ``r < E % W``, else ``E // W`` (always ``>= 1``).

    Example:
        >>> ExpertPartition(num_experts=10, world_size=4).offsets
        (0, 3, 6, 8, 10)
    """

    num_experts: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("num_experts", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExpertPartition.{name} must be a positive int, got {value!r}")
        if self.num_experts < self.world_size:
            raise ValueError(
                f"expert parallelism over {self.world_size} ranks needs num_experts >= {self.world_size} "
                f"(every rank owns at least one expert), got num_experts={self.num_experts}"
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        """``[W]`` experts per rank."""
        base, extra = divmod(self.num_experts, self.world_size)
        return tuple(base + (rank < extra) for rank in range(self.world_size))

    @property
    def offsets(self) -> tuple[int, ...]:
        """``[W + 1]`` first global expert id of each rank, then ``E``."""
        offsets = [0]
        for size in self.sizes:
            offsets.append(offsets[-1] + size)
        return tuple(offsets)

    def experts_of(self, rank: int) -> range:
        """The global ids of the routed experts ``rank`` owns."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is not in 0..{self.world_size - 1}")
        return range(self.offsets[rank], self.offsets[rank + 1])


@dataclass
class ExpertShard:
    """The weights one rank holds under expert parallelism.

    Attributes:
        router: ``[E, H]``, the whole router (replicated on every rank).
        gate_up: ``[E_r, H, 2D]``, this rank's routed experts, global ids
            ``first_expert .. first_expert + E_r - 1``, packed as in :class:`moeflux.MoEWeights`.
        down: ``[E_r, D, H]``.
        shared_gate_up: ``[S, H, 2D]``, the ``S`` slices of the shared expert (replicated).
        shared_down: ``[S, D, H]``.
        first_expert: global id of this rank's first routed expert.
        expert_bias: ``None``, or ``[E]`` float32, the router's correction bias
            (:attr:`moeflux.MoEWeights.expert_bias`; replicated: update it from the loads
            summed over the ranks).
    """

    router: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    shared_gate_up: torch.Tensor
    shared_down: torch.Tensor
    first_expert: int
    expert_bias: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_weights(cls, weights: MoEWeights, partition: ExpertPartition, rank: int) -> ExpertShard:
        """Rank ``rank``'s part of the whole layer's packed ``weights`` (views, no copy)."""
        weights.validate()
        if weights.num_experts != partition.num_experts:
            raise ValueError(
                f"the weights hold {weights.num_experts} routed experts but the partition splits "
                f"{partition.num_experts}"
            )
        experts = partition.experts_of(rank)
        E = weights.num_experts
        return cls(
            router=weights.router,
            gate_up=weights.gate_up[experts.start : experts.stop],
            down=weights.down[experts.start : experts.stop],
            shared_gate_up=weights.gate_up[E:],
            shared_down=weights.down[E:],
            first_expert=experts.start,
            expert_bias=weights.expert_bias,
        )

    @property
    def num_experts(self) -> int:
        """``E``, all routed experts (the router's rows)."""
        return self.router.shape[0]

    @property
    def num_local_experts(self) -> int:
        """``E_r``, the routed experts this rank holds."""
        return self.gate_up.shape[0]

    @property
    def num_shared_experts(self) -> int:
        return self.shared_gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.router.shape[1]

    def check(self, partition: ExpertPartition, rank: int) -> None:
        """Raise ``ValueError`` unless this shard is rank ``rank``'s part under ``partition``
        and its tensors form one layer."""
        experts = partition.experts_of(rank)
        if self.num_experts != partition.num_experts or self.first_expert != experts.start or (
            self.num_local_experts != len(experts)
        ):
            raise ValueError(
                f"rank {rank} of {partition.world_size} owns routed experts {experts.start}..{experts.stop - 1} "
                f"of {partition.num_experts}, but the shard holds {self.num_local_experts} expert(s) from "
                f"{self.first_expert} with a router of {self.num_experts} rows"
            )
        H, D = self.hidden_size, self.down.shape[-2] if self.down.dim() == 3 else -1
        shapes = {
            "gate_up": (self.gate_up, (self.num_local_experts, H, 2 * D)),
            "down": (self.down, (self.num_local_experts, D, H)),
            "shared_gate_up": (self.shared_gate_up, (self.num_shared_experts, H, 2 * D)),
            "shared_down": (self.shared_down, (self.num_shared_experts, D, H)),
        }
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"ExpertShard.{name} has shape {list(tensor.shape)}, expected {list(shape)} "
                    f"(router {list(self.router.shape)}, down {list(self.down.shape)})"
                )
        tensors = (self.router, self.gate_up, self.down, self.shared_gate_up, self.shared_down)
        if len({(t.dtype, t.device) for t in tensors}) != 1:
            listed = ", ".join(f"{t.dtype} on {t.device}" for t in tensors)
            raise ValueError(f"ExpertShard tensors must share one dtype and device, got {listed}")

    def routed_weights(self) -> MoEWeights:
        """This rank's routed experts as :class:`moeflux.MoEWeights` (``E_r`` experts, no
        shared), local ids ``0 .. E_r - 1``; one object while the tensors stay the same, so
        the Triton kernels' address tables are built once."""
        experts = slice(self.first_expert, self.first_expert + self.num_local_experts)
        return self._cached("routed", lambda: MoEWeights(self.router[experts], self.gate_up, self.down))

    def shared_weights(self) -> MoEWeights | None:
        """The ``S`` shared slices as ``S`` routed experts of :class:`moeflux.MoEWeights` (which
        every token picks, weight 1); ``None`` when ``S = 0``. The router rows are a
        placeholder of zeros (only their shape is read)."""
        if self.num_shared_experts == 0:
            return None

        def build():
            placeholder = self.shared_gate_up.new_zeros(()).expand(self.num_shared_experts, self.hidden_size)
            return MoEWeights(placeholder, self.shared_gate_up, self.shared_down)

        return self._cached("shared", build)

    def _cached(self, name: str, build):
        key = (self.router, self.gate_up, self.down, self.shared_gate_up, self.shared_down)
        entry = self._cache.get(name)
        if entry is None or any(a is not b for a, b in zip(entry[0], key)):
            entry = self._cache[name] = (key, build())
        return entry[1]
