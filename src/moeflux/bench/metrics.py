"""What one timed row reports beside its latencies: throughput, efficiency, correctness, load.

Definitions (``T`` tokens, ``t`` the median time of one call):

* ``tokens_per_s = T / t``.
* ``tflops = flops / t`` with ``flops`` counted from the shape (see ``Shape.flops``), never
  from what a system happens to execute: a system that does extra work gets no credit.
* ``pct_peak = tflops / gemm_tflops``: share of this device's dense-GEMM peak measured in
  the same run (:mod:`moeflux.bench.calibrate`).
* ``gbps = bytes / t`` with the fewest bytes the call must move (``Shape.bytes_moved``);
  ``pct_copy_bw = gbps / copy_gbps``.
* ``floor_ms = max(flops / gemm peak, bytes / copy bandwidth)``, the roofline floor;
  ``pct_of_floor = floor_ms / t``: 100% would be a perfect kernel.
* ``max_abs_err`` and ``rel_l2 = ||out - ref|| / ||ref||`` against the shape's reference
  output (the seed reference in the run's dtype; the torch path for flash expert).
* ``load_imbalance = max / mean`` of the tokens per expert (1.0 is perfectly even).
"""

from __future__ import annotations

import math

import torch

from moeflux.bench.calibrate import DevicePeaks


def throughput(flops: int, bytes_moved: int, tokens: int, median_ms: float, peaks: DevicePeaks) -> dict[str, float]:
    seconds = median_ms / 1e3
    tflops = flops / seconds / 1e12
    gbps = bytes_moved / seconds / 1e9
    floor_ms = peaks.floor_ms(flops, bytes_moved)
    return {
        "tokens_per_s": tokens / seconds,
        "tflops": tflops,
        "pct_peak": 100 * tflops / peaks.gemm_tflops,
        "gbps": gbps,
        "pct_copy_bw": 100 * gbps / peaks.copy_gbps,
        "pct_of_floor": 100 * floor_ms / median_ms,
    }


def errors(out: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max absolute error and relative L2 error of ``out`` against ``reference`` (in float32)."""
    diff = out.detach().reshape(reference.shape).float() - reference.float()
    norm = reference.float().norm().item()
    return {
        "max_abs_err": diff.abs().max().item() if diff.numel() else 0.0,
        "rel_l2": diff.norm().item() / norm if norm > 0 else diff.norm().item(),
    }


def load_summary(tokens_per_expert: torch.Tensor, keep_counts_up_to: int = 4096) -> dict:
    """Active experts, min / mean / max tokens per expert and the imbalance ``max / mean``;
    the per-expert counts themselves when there are at most ``keep_counts_up_to`` experts."""
    counts = tokens_per_expert.detach().to(torch.int64).cpu()
    mean = counts.double().mean().item()
    return {
        "active_experts": int((counts > 0).sum()),
        "min_tokens_per_expert": int(counts.min()),
        "mean_tokens_per_expert": mean,
        "max_tokens_per_expert": int(counts.max()),
        "load_imbalance": counts.max().item() / mean if mean > 0 else 0.0,
        "tokens_per_expert": counts.tolist() if counts.numel() <= keep_counts_up_to else None,
    }


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
