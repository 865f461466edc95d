"""Load balancing a trainer runs beside the optimizer, and expert-usage monitoring.

* :class:`ExpertBiasUpdater`: DeepSeek-V3's auxiliary-loss-free balancing. The router ranks
  experts by ``score + expert_bias`` (:attr:`moeflux.RouterConfig.expert_bias`); after each
  optimizer step the bias moves by a fixed amount towards balance,
  ``bias_i += rate * sign(mean_load - load_i)``: overloaded experts become less likely to be
  chosen, idle ones more. The weights never see the bias.
* :class:`ExpertUsageMonitor`: a running per-expert load, dead experts, dropped pairs.

The per-expert loads are the layer's ``aux.tokens_per_expert`` (the router's choices, before
any capacity drop). Both helpers only update device tensors (no host sync) except the
methods that return Python numbers.

Example:
    >>> config = moeflux.MoEConfig(hidden_size=64, expert_size=32, num_experts=8, top_k=2,
    ...                            router=moeflux.RouterConfig(scoring="sigmoid", expert_bias=True))
    >>> layer = moeflux.MoE(config)
    >>> updater = ExpertBiasUpdater(layer.expert_bias, rate=1e-3)
    >>> monitor = ExpertUsageMonitor(config.num_experts)
    >>> out, aux = layer(torch.randn(4, 16, 64))
    >>> out.square().mean().backward()          # optimizer.step() would follow
    >>> updater.accumulate(aux.tokens_per_expert); updater.step()
    >>> monitor.update(aux.tokens_per_expert)
"""

from __future__ import annotations

import math

import torch


def _check_counts(counts: torch.Tensor, num_experts: int, name: str) -> None:
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (num_experts,):
        described = list(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"{name} must be a tensor [{num_experts}] (one count per expert), got {described}")


class ExpertBiasUpdater:
    """Auxiliary-loss-free load balancing: ``bias_i += rate * sign(mean_load - load_i)``.

    ``load_i`` is the (token, slot) pairs routed to expert ``i`` since the last :meth:`step`
    (summed over :meth:`accumulate` calls: micro-batches of one optimizer step). The bias is
    updated in place, so a layer holding it as a buffer routes with the new bias at its next
    forward. For data parallelism, all-reduce :attr:`load` (a sum) before :meth:`step` so every
    rank applies the same update.

    Args:
        expert_bias: ``[E]`` float32 tensor updated in place, e.g. ``layer.expert_bias``
            (:class:`moeflux.MoE` with ``router.expert_bias`` on).
        rate: the step size ``gamma`` (DeepSeek-V3: 1e-3), a finite number > 0.
    """

    def __init__(self, expert_bias: torch.Tensor, rate: float = 1e-3) -> None:
        if not isinstance(expert_bias, torch.Tensor) or expert_bias.dtype != torch.float32 or expert_bias.dim() != 1:
            described = (
                f"{expert_bias.dtype} {list(expert_bias.shape)}" if isinstance(expert_bias, torch.Tensor)
                else type(expert_bias).__name__
            )  # fmt: skip
            raise ValueError(f"ExpertBiasUpdater needs a float32 [E] expert_bias tensor, got {described}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"ExpertBiasUpdater rate must be a finite number > 0, got {rate!r}")
        self.expert_bias = expert_bias
        self.rate = float(rate)
        self.load = torch.zeros(expert_bias.shape[0], dtype=torch.int64, device=expert_bias.device)

    def accumulate(self, tokens_per_expert: torch.Tensor) -> None:
        """Add one forward's ``[E]`` per-expert counts to the load of this step."""
        _check_counts(tokens_per_expert, self.load.shape[0], "tokens_per_expert")
        self.load += tokens_per_expert.detach().to(device=self.load.device, dtype=torch.int64)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Move the bias by ``rate * sign(mean_load - load)`` and start a new step; returns the
        ``[E]`` int64 load it used. Experts exactly at the mean load keep their bias."""
        load = self.load.clone()
        load_float = load.to(torch.float32)
        self.expert_bias.add_(torch.sign(load_float.mean() - load_float), alpha=self.rate)
        self.load.zero_()
        return load


class ExpertUsageMonitor:
    """Running per-expert usage, fed each step's ``tokens_per_expert``.

    Attributes (device tensors, updated without a host sync):
        load_fraction: ``[E]`` float32, exponential moving average of each expert's share of
            the (token, slot) pairs (the first update sets it; sums to 1 after any update with
            tokens).
        total_tokens: ``[E]`` int64, pairs routed to each expert since construction.
        total_dropped: ``[E]`` int64, pairs dropped by the capacity, when given to :meth:`update`.
        steps_since_used: ``[E]`` int64, updates since each expert last received a pair.
        num_updates: updates so far (a Python int).

    Args:
        num_experts: ``E``.
        momentum: weight of the past in the moving average, in ``[0, 1)``.
        dead_after: an expert is dead after this many consecutive updates without a pair.
        device: where the statistics live (the counts' device).
    """

    def __init__(
        self,
        num_experts: int,
        *,
        momentum: float = 0.9,
        dead_after: int = 100,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("num_experts", num_experts), ("dead_after", dead_after)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ExpertUsageMonitor {name} must be a positive int, got {value!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"ExpertUsageMonitor momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.dead_after = dead_after
        self.load_fraction = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self.total_tokens = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.total_dropped = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.steps_since_used = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.num_updates = 0

    @property
    def num_experts(self) -> int:
        return self.load_fraction.shape[0]

    @torch.no_grad()
    def update(self, tokens_per_expert: torch.Tensor, dropped_per_expert: torch.Tensor | None = None) -> None:
        """Record one step's ``[E]`` counts (and optionally its ``[E]`` dropped pairs)."""
        _check_counts(tokens_per_expert, self.num_experts, "tokens_per_expert")
        counts = tokens_per_expert.detach().to(device=self.total_tokens.device, dtype=torch.int64)
        fraction = counts.to(torch.float32) / counts.sum().clamp_min(1).to(torch.float32)
        if self.num_updates == 0:
            self.load_fraction.copy_(fraction)
        else:
            self.load_fraction.lerp_(fraction, 1.0 - self.momentum)
        self.total_tokens += counts
        self.steps_since_used = torch.where(counts > 0, 0, self.steps_since_used + 1)
        if dropped_per_expert is not None:
            _check_counts(dropped_per_expert, self.num_experts, "dropped_per_expert")
            self.total_dropped += dropped_per_expert.detach().to(device=self.total_dropped.device, dtype=torch.int64)
        self.num_updates += 1

    def dead_experts(self) -> torch.Tensor:
        """``[E]`` bool: experts without a pair in the last ``dead_after`` updates."""
        return self.steps_since_used >= self.dead_after

    def num_dead_experts(self) -> int:
        """How many experts are dead (reads one number from the device: a host sync)."""
        return int(self.dead_experts().sum())

    def max_violation(self) -> torch.Tensor:
        """DeepSeek's MaxVio of the running load: ``max_i load_i / mean_load - 1`` (0 when balanced)."""
        return self.num_experts * self.load_fraction.max() - 1.0

    def summary(self) -> dict[str, float]:
        """Numbers to log (reads them from the device: a host sync): ``dead_experts``,
        ``max_violation``, ``min_load_fraction``, ``max_load_fraction``, ``dropped_fraction``."""
        total = self.total_tokens.sum().clamp_min(1)
        return {
            "dead_experts": float(self.num_dead_experts()),
            "max_violation": float(self.max_violation()),
            "min_load_fraction": float(self.load_fraction.min()),
            "max_load_fraction": float(self.load_fraction.max()),
            "dropped_fraction": float(self.total_dropped.sum() / total),
        }
