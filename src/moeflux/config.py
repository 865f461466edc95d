"""Shape and routing configuration of a moeflux MoE layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterConfig:
    """How the router turns logits ``[T, E]`` into ``top_k`` experts and their weights.

    The default is the seed competition's rule: softmax, top-k, weights the chosen
    probabilities (no renormalisation). In order:

    1. ``scores = softmax(logits)`` or ``sigmoid(logits)`` (``scoring``), in float32.
    2. Choice scores: ``scores`` (rounded to the logits' dtype), or the logits themselves with
       ``softmax_after_topk``; plus the per-expert correction bias when ``expert_bias`` is on.
    3. With ``num_groups > 1``, the experts form ``num_groups`` groups of consecutive ids; a
       group's score is the sum of its two best choice scores; only the ``topk_groups`` best
       groups stay eligible.
    4. The ``top_k`` eligible experts with the largest choice scores are chosen, best first,
       ties to the lower id.
    5. Weights: the chosen ``scores`` (the bias never weights), or the softmax over the chosen
       logits with ``softmax_after_topk``; divided by their sum with ``normalize_topk``; times
       ``scaling_factor``.
    6. With ``capacity_factor``, each expert keeps at most ``ceil(capacity_factor * T * top_k / E)``
       of its (token, slot) pairs, earliest tokens first; the rest get weight 0 (the token
       passes through the residual for that slot) and are counted.

    Presets: Mixtral / OLMoE / Qwen3-MoE with ``norm_topk_prob``: ``normalize_topk=True``;
    DeepSeek-V3: ``scoring="sigmoid", expert_bias=True, num_groups=8, topk_groups=4,
    normalize_topk=True, scaling_factor=2.5``; gpt-oss: ``softmax_after_topk=True``.

    Args:
        scoring: ``"softmax"`` or ``"sigmoid"``.
        normalize_topk: renormalise the chosen weights to sum to 1 per token.
        softmax_after_topk: choose on the logits, weight by the softmax over the ``k`` chosen
            logits (gpt-oss). Needs ``scoring="softmax"`` and ``normalize_topk=False``.
        num_groups: expert groups for group-limited top-k (1: no groups).
        topk_groups: groups kept per token, ``1 <= topk_groups <= num_groups``.
        scaling_factor: multiplies the final weights (DeepSeek's ``routed_scaling_factor``).
        expert_bias: the layer holds a per-expert float32 correction bias, added to the choice
            scores only (DeepSeek-V3's ``e_score_correction_bias``; updated by
            :class:`moeflux.balancing.ExpertBiasUpdater`, not by gradients).
        jitter: training-only multiplicative noise on the router input,
            ``x * U(1 - jitter, 1 + jitter)`` (Switch Transformer); ``0 <= jitter < 1``.
        capacity_factor: ``None`` (default: no dropping) or a number > 0 (Switch Transformer).
    """

    scoring: str = "softmax"
    normalize_topk: bool = False
    softmax_after_topk: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0
    expert_bias: bool = False
    jitter: float = 0.0
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"RouterConfig.scoring must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        for name in ("normalize_topk", "softmax_after_topk", "expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RouterConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("num_groups", "topk_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RouterConfig.{name} must be a positive int, got {value!r}")
        if self.topk_groups > self.num_groups:
            raise ValueError(f"RouterConfig.topk_groups={self.topk_groups} exceeds num_groups={self.num_groups}")
        if self.softmax_after_topk and self.scoring != "softmax":
            raise ValueError(
                "RouterConfig.softmax_after_topk weights by a softmax over the chosen logits and needs "
                f"scoring='softmax', got scoring={self.scoring!r}"
            )
        if self.softmax_after_topk and self.normalize_topk:
            raise ValueError(
                "RouterConfig.softmax_after_topk already gives weights that sum to 1; leave normalize_topk off"
            )
        if not _is_real(self.scaling_factor) or not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"RouterConfig.scaling_factor must be a finite number > 0, got {self.scaling_factor!r}")
        if not _is_real(self.jitter) or not 0 <= self.jitter < 1:
            raise ValueError(f"RouterConfig.jitter must be a number in [0, 1), got {self.jitter!r}")
        if self.capacity_factor is not None and (
            not _is_real(self.capacity_factor) or not (math.isfinite(self.capacity_factor) and self.capacity_factor > 0)
        ):
            raise ValueError(
                f"RouterConfig.capacity_factor must be None or a finite number > 0, got {self.capacity_factor!r}"
            )

    def validate(self, num_experts: int, top_k: int) -> None:
        """Raise ``ValueError`` unless this router can pick ``top_k`` of ``num_experts`` experts."""
        if num_experts % self.num_groups:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by RouterConfig.num_groups={self.num_groups}"
            )
        eligible = self.topk_groups * (num_experts // self.num_groups)
        if top_k > eligible:
            raise ValueError(
                f"top_k={top_k} exceeds the {eligible} experts of the topk_groups={self.topk_groups} groups kept "
                f"per token (num_experts={num_experts}, num_groups={self.num_groups})"
            )

    def capacity(self, num_tokens: int, num_experts: int, top_k: int) -> int | None:
        """Pairs each expert keeps: ``ceil(capacity_factor * T * top_k / E)``; ``None`` without a capacity."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * top_k / num_experts)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        router: the routing rule (:class:`RouterConfig`); the default is softmax top-k with
            the chosen probabilities as weights.
    """

    hidden_size: int
    expert_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    router: RouterConfig = RouterConfig()

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
        if not isinstance(self.router, RouterConfig):
            raise TypeError(f"MoEConfig.router must be a RouterConfig, got {type(self.router).__name__}")
        self.router.validate(self.num_experts, self.top_k)

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
