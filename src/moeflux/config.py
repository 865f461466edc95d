"""Shape and routing configuration of a moeflux MoE layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing rule of a DeepSeek-style MoE layer.

    Args:
        hidden_size: model width ``H``.
        expert_size: intermediate width ``D`` of one routed expert (SwiGLU).
        num_experts: number of routed experts ``E``.
        top_k: routed experts per token ``k`` (``1 <= k <= E``).
        num_shared_experts: ``S``; the shared expert is one SwiGLU of width ``D * S``
            applied to every token with weight 1. ``0`` disables it.
        normalize_topk: renormalise the chosen router probabilities to sum to 1
            per token. Off by default: the weights are the softmax probabilities.
    """

    hidden_size: int
    expert_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    normalize_topk: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "expert_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(
                f"MoEConfig.num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )

    @classmethod
    def from_seed_config(cls, config: Mapping[str, Any]) -> "MoEConfig":
        """Build from the GPU MODE competition's config dict (``d_hidden``, ``d_expert``, ...)."""
        keys = ("d_hidden", "d_expert", "n_routed_experts", "n_shared_experts", "n_experts_per_token")
        missing = [key for key in keys if key not in config]
        if missing:
            raise KeyError(f"seed config is missing key(s) {missing}")
        return cls(
            hidden_size=int(config["d_hidden"]),
            expert_size=int(config["d_expert"]),
            num_experts=int(config["n_routed_experts"]),
            top_k=int(config["n_experts_per_token"]),
            num_shared_experts=int(config["n_shared_experts"]),
        )
