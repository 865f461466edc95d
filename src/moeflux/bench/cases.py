"""A shape's inputs on a device, built once and shared by every system timed on it.

* :class:`MoECase`: the competition's seed-format data (``x [bs, seq, H]``, the per-expert
  weight dict, the config dict) and moeflux's packed copy of the same weights.
* :class:`FlashExpertCase`: the hidden states, both expert pools, indices and weights.

Each case computes its correctness reference once (:meth:`reference`) and the load of its
experts (:meth:`expert_load`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflux import gpumode
from moeflux.bench.shapes import FlashExpertShape, Shape
from moeflux.config import MoEConfig
from moeflux.ops.routing import route
from moeflux.weights import MoEWeights


@dataclass
class MoECase:
    """One MoE shape's inputs: seed format and packed (both hold the same numbers).

    Attributes:
        x: ``[bs, seq, H]`` input in the run's dtype.
        seed_weights: the competition's weight dict (``router.weight``, ``experts.{i}.{0,1,2}.weight``,
            ``shared_experts.{0,1,2}.weight``), in the run's dtype.
        seed_config: the competition's config dict.
        config, weights: moeflux's config and packed weights.
    """

    shape: Shape
    x: torch.Tensor
    seed_weights: dict[str, torch.Tensor]
    seed_config: dict
    config: MoEConfig
    weights: MoEWeights

    @classmethod
    def build(cls, shape: Shape, device: torch.device, dtype: torch.dtype) -> "MoECase":
        x, seed_weights, seed_config = gpumode.generate_input(**shape.seed_args(), device=device)
        if dtype != torch.float16:
            x = x.to(dtype)
            seed_weights = {key: value.to(dtype) for key, value in seed_weights.items()}
        config = MoEConfig.from_seed_config(seed_config)
        return cls(shape, x, seed_weights, seed_config, config, MoEWeights.from_seed_weights(seed_weights, config))

    @property
    def seed_data(self) -> gpumode.SeedData:
        """``(x, weights, config)``, what :func:`moeflux.gpumode.ref_kernel` takes."""
        return self.x, self.seed_weights, self.seed_config

    def with_tokens(self, tokens: int) -> "MoECase":
        """The same weights with the first ``tokens`` tokens of ``x`` as one sequence (serving
        replays requests of several sizes through one set of prepared systems)."""
        flat = self.x.reshape(-1, self.x.shape[-1])[:tokens]
        return dataclasses.replace(self, x=flat.view(1, tokens, -1), shape=self.shape.with_tokens(tokens))

    def reference(self) -> torch.Tensor:
        """The seed reference (the competition's algorithm) in the run's dtype, ``[T, H]``."""
        with torch.no_grad():
            return gpumode.ref_kernel(self.seed_data).reshape(-1, self.x.shape[-1])

    def expert_load(self) -> torch.Tensor:
        """``[E]`` int64: (token, slot) pairs routed to each expert, by moeflux's routing rule."""
        with torch.no_grad():
            logits = F.linear(self.x.reshape(-1, self.x.shape[-1]), self.weights.router)
            return route(logits, self.config.top_k, backend="torch").tokens_per_expert


@dataclass
class FlashExpertCase:
    """One flash-expert call's inputs: uniformly random expert ids (what a product-key
    router over a large pool gives on average) and softmax routing weights."""

    shape: FlashExpertShape
    hidden_states: torch.Tensor  # [T, H]
    down_weights: torch.Tensor  # [E, H]
    up_weights: torch.Tensor  # [E, H]
    indices: torch.Tensor  # [T, K] int64
    routing_weights: torch.Tensor  # [T, K] float32

    @classmethod
    def build(cls, shape: FlashExpertShape, device: torch.device, dtype: torch.dtype) -> "FlashExpertCase":
        generator = torch.Generator(device=device).manual_seed(shape.seed)
        T, H, E, K = shape.tokens, shape.hidden, shape.num_experts, shape.top_k

        def draw(*size: int, scale: float) -> torch.Tensor:
            return (torch.randn(size, device=device, generator=generator) * scale).to(dtype)

        return cls(
            shape,
            hidden_states=draw(T, H, scale=1.0),
            down_weights=draw(E, H, scale=1 / math.sqrt(H)),
            up_weights=draw(E, H, scale=1 / math.sqrt(K)),
            indices=torch.randint(0, E, (T, K), device=device, generator=generator),
            routing_weights=torch.randn(T, K, device=device, generator=generator).softmax(dim=-1),
        )

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.hidden_states, self.down_weights, self.up_weights, self.indices, self.routing_weights

    def reference(self) -> torch.Tensor:
        """The plain-PyTorch flash expert, ``[T, H]``."""
        from moeflux.ops.flash_expert import flash_expert

        with torch.no_grad():
            return flash_expert(*self.inputs(), backend="torch")

    def expert_load(self) -> torch.Tensor:
        return torch.bincount(self.indices.reshape(-1), minlength=self.shape.num_experts)


def build_case(shape: Shape | FlashExpertShape, device: torch.device, dtype: torch.dtype):
    if isinstance(shape, FlashExpertShape):
        return FlashExpertCase.build(shape, device, dtype)
    return MoECase.build(shape, device, dtype)
