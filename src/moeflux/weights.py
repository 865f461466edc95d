"""The packed weight layout every moeflux backend reads.

A shared expert of width ``D * S`` is ``S`` slices of width ``D``: SwiGLU is separable
along its intermediate dimension, so ``down(silu(x G) * (x U))`` with ``G = [G_0 | G_1]``,
``U = [U_0 | U_1]`` and ``down = [down_0; down_1]`` is the sum of the two slices. moeflux
therefore stores the shared expert as ``S`` extra experts appended after the routed ones,
which every token visits with weight 1; kernels treat them like any other expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from moeflux.config import MoEConfig


@dataclass
class MoEWeights:
    """Stacked weights of one MoE layer.

    Attributes:
        router: ``[E, H]``, the router ``W_g``; logits are ``x @ router.T``.
        gate_up: ``[E + S, H, 2 * D]``; columns ``[:D]`` are ``W_gate``, ``[D:]`` are ``W_up``.
            Experts ``E .. E + S - 1`` are the slices of the shared expert.
        down: ``[E + S, D, H]``, ``W_down``.
        expert_bias: ``None``, or ``[E]`` float32: the router's per-expert correction bias
            (:attr:`moeflux.RouterConfig.expert_bias`), added to the scores the router ranks
            experts by and never to the weights; not trained by gradients (see
            :class:`moeflux.balancing.ExpertBiasUpdater`).
    """

    router: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    expert_bias: torch.Tensor | None = None
    _tables: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def expert_tables(self):
        """The :class:`moeflux.expert_tables.ExpertTables` the Triton kernels read, built once
        and reused while the tensors stay where they are (in-place updates keep addresses)."""
        key = (self.gate_up.data_ptr(), self.down.data_ptr(), self.gate_up.stride(), self.down.stride(),
               self.gate_up.shape, self.down.shape, self.gate_up.dtype, self.num_experts)  # fmt: skip
        if self._tables is None or self._tables[0] != key:
            from moeflux.expert_tables import ExpertTables

            self._tables = (key, ExpertTables.from_packed(self.gate_up, self.down, self.num_experts))
        return self._tables[1]

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    @property
    def num_shared_experts(self) -> int:
        return self.gate_up.shape[0] - self.router.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.router.shape[1]

    @property
    def expert_size(self) -> int:
        return self.down.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up.dtype

    @property
    def device(self) -> torch.device:
        return self.gate_up.device

    def validate(self) -> None:
        """Raise ``ValueError`` unless the three tensors form one consistent layer."""
        tensors = {"router": self.router, "gate_up": self.gate_up, "down": self.down}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"MoEWeights.{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise TypeError(f"MoEWeights.{name} must be floating point, got {tensor.dtype}")
        if self.router.dim() != 2 or self.gate_up.dim() != 3 or self.down.dim() != 3:
            raise ValueError(
                "MoEWeights expects router [E, H], gate_up [E+S, H, 2D], down [E+S, D, H]; got "
                f"{tuple(self.router.shape)}, {tuple(self.gate_up.shape)}, {tuple(self.down.shape)}"
            )
        E, H = self.router.shape
        experts, D = self.down.shape[0], self.down.shape[1]
        if experts < E or self.gate_up.shape != (experts, H, 2 * D) or self.down.shape != (experts, D, H):
            raise ValueError(
                f"inconsistent MoEWeights: router {tuple(self.router.shape)}, gate_up "
                f"{tuple(self.gate_up.shape)}, down {tuple(self.down.shape)}; expected gate_up "
                f"[E+S, {H}, 2D] and down [E+S, D, {H}] with E+S >= {E}"
            )
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1:
            raise TypeError(f"MoEWeights tensors have mixed dtypes {sorted(map(str, dtypes))}")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"MoEWeights tensors live on different devices {sorted(map(str, devices))}")
        bias = self.expert_bias
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32 or tuple(bias.shape) != (E,):
                described = f"{bias.dtype} {list(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"MoEWeights.expert_bias must be None or float32 [E={E}], got {described}")
            if bias.device != self.router.device:
                raise ValueError(f"MoEWeights.expert_bias is on {bias.device} but the weights are on {self.router.device}")

    @classmethod
    def empty(
        cls, config: MoEConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "MoEWeights":
        """Uninitialised weights with the shapes of ``config``; a zero ``expert_bias`` when
        ``config.router.expert_bias`` is on."""
        E, S = config.num_experts, config.num_shared_experts
        H, D = config.hidden_size, config.expert_size
        kwargs = {"device": device, "dtype": dtype}
        return cls(
            router=torch.empty(E, H, **kwargs),
            gate_up=torch.empty(E + S, H, 2 * D, **kwargs),
            down=torch.empty(E + S, D, H, **kwargs),
            expert_bias=torch.zeros(E, device=device, dtype=torch.float32) if config.router.expert_bias else None,
        )

    @classmethod
    def random(
        cls,
        config: MoEConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> "MoEWeights":
        """Random weights with the shapes of ``config`` (see :meth:`normal_`)."""
        return cls.empty(config, device=device, dtype=dtype).normal_(generator=generator)

    def normal_(self, generator: torch.Generator | None = None) -> "MoEWeights":
        """Fill in place with Gaussians scaled as in the competition's inputs, which keeps
        activations near unit variance: router and down ``1/sqrt(H)``, gate and up ``1/sqrt(D)``."""
        with torch.no_grad():
            self.router.normal_(0.0, 1.0 / math.sqrt(self.hidden_size), generator=generator)
            self.gate_up.normal_(0.0, 1.0 / math.sqrt(self.expert_size), generator=generator)
            self.down.normal_(0.0, 1.0 / math.sqrt(self.hidden_size), generator=generator)
        return self

    @classmethod
    def from_seed_weights(cls, weights: Mapping[str, torch.Tensor], config: MoEConfig) -> "MoEWeights":
        """Pack the competition's per-expert weight dict (copies the weights once).

        Keys: ``router.weight [E, H]``; ``experts.{i}.0.weight [H, D]`` (gate),
        ``experts.{i}.1.weight [H, D]`` (up), ``experts.{i}.2.weight [D, H]`` (down);
        ``shared_experts.{0,1,2}.weight`` with width ``D * S`` (absent or empty when ``S = 0``).
        """
        E, S = config.num_experts, config.num_shared_experts
        H, D = config.hidden_size, config.expert_size

        def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            if key not in weights:
                raise KeyError(f"seed weights are missing key {key!r} (expected shape {list(shape)})")
            tensor = weights[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"seed weight {key!r} has shape {list(tensor.shape)}, expected {list(shape)}")
            return tensor

        router = get("router.weight", (E, H))
        gates = [get(f"experts.{i}.0.weight", (H, D)) for i in range(E)]
        ups = [get(f"experts.{i}.1.weight", (H, D)) for i in range(E)]
        downs = [get(f"experts.{i}.2.weight", (D, H)) for i in range(E)]
        if S > 0:
            shared_gate = get("shared_experts.0.weight", (H, D * S))
            shared_up = get("shared_experts.1.weight", (H, D * S))
            shared_down = get("shared_experts.2.weight", (D * S, H))
            gates += list(shared_gate.split(D, dim=1))
            ups += list(shared_up.split(D, dim=1))
            downs += list(shared_down.split(D, dim=0))

        packed = cls.empty(config, device=router.device, dtype=router.dtype)
        with torch.no_grad():
            packed.router.copy_(router)
            for e in range(E + S):
                packed.gate_up[e, :, :D].copy_(gates[e])
                packed.gate_up[e, :, D:].copy_(ups[e])
                packed.down[e].copy_(downs[e])
        packed.validate()
        return packed

    def to_seed_weights(self) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`from_seed_weights` (new tensors)."""
        E, D = self.num_experts, self.expert_size
        gate_up, down = self.gate_up.detach(), self.down.detach()
        out = {"router.weight": self.router.detach().clone()}
        for e in range(E):
            out[f"experts.{e}.0.weight"] = gate_up[e, :, :D].clone()
            out[f"experts.{e}.1.weight"] = gate_up[e, :, D:].clone()
            out[f"experts.{e}.2.weight"] = down[e].clone()
        # [S, H, D] -> [H, S * D]: slice s holds shared columns s*D .. (s+1)*D.
        out["shared_experts.0.weight"] = gate_up[E:, :, :D].permute(1, 0, 2).reshape(self.hidden_size, -1).clone()
        out["shared_experts.1.weight"] = gate_up[E:, :, D:].permute(1, 0, 2).reshape(self.hidden_size, -1).clone()
        out["shared_experts.2.weight"] = down[E:].reshape(-1, self.hidden_size).clone()
        return out
