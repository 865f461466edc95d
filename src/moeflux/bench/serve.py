"""``moeflux bench --serve``: replay a stream of requests of mixed sizes through each system.

A serving engine calls the MoE layer once per scheduler step with however many tokens the
step holds: many small decode steps (one token per running sequence) between a few large
prefills. The stream here is drawn from a fixed seed: three in four requests are decode
steps of 1 to 64 tokens, one in four a prefill of 256 to 4096 tokens (capped at the run's
largest shape). Requests run one at a time, each timed alone, as the engine waits for each
step's result; every distinct size is run once first, so compilation is not counted.
"""

from __future__ import annotations

import random
import statistics
import sys

import torch

from moeflux.bench.cases import MoECase
from moeflux.bench.shapes import Shape
from moeflux.bench.systems import make_system
from moeflux.bench.timing import Progress, percentile, time_ms

DECODE_SIZES = [1, 2, 4, 8, 16, 32, 64]
PREFILL_SIZES = [256, 512, 1024, 2048, 4096]
DECODE_SHARE = 0.75


def request_stream(num_requests: int, max_tokens: int, seed: int = 0) -> list[tuple[str, int]]:
    """``(kind, tokens)`` per request, ``kind`` being ``"decode"`` or ``"prefill"``."""
    rng = random.Random(seed)
    prefills = [size for size in PREFILL_SIZES if size <= max_tokens] or [max_tokens]
    decodes = [size for size in DECODE_SIZES if size <= max_tokens]
    return [
        ("decode", rng.choice(decodes)) if rng.random() < DECODE_SHARE else ("prefill", rng.choice(prefills))
        for _ in range(num_requests)
    ]


def run_serve(
    layer: Shape, system_names: list[str], device: torch.device, dtype: torch.dtype, *, num_requests: int,
    max_tokens: int,
) -> list[dict]:  # fmt: skip
    """Per system: requests, tokens, total time, tokens/s and per-request latency percentiles."""
    stream = request_stream(num_requests, max_tokens)
    case = MoECase.build(layer.with_tokens(max(tokens for _, tokens in stream)), device, dtype)
    views = {tokens: case.with_tokens(tokens) for tokens in sorted({tokens for _, tokens in stream})}
    results = []
    progress = Progress(len(system_names), "serve")
    for name in system_names:
        system = make_system(name)
        if getattr(system, "workload", "moe") != "moe" or not system.available(device):
            progress.step(f"{name} (skipped)")
            continue
        try:
            latencies, ordered = _replay(system, case, views, stream, device)
        except Exception as error:  # noqa: BLE001 - a failing system must not stop the others
            sys.stderr.write(f"serve: {name} failed: {type(error).__name__}: {error}\n")
            progress.step(f"{name} (failed)")
            continue
        finally:
            system.release()
        total_ms = sum(ordered)
        tokens = sum(tokens for _, tokens in stream)
        ranked = sorted(ordered)
        results.append({
            "system": name, "layer": layer.layer, "requests": len(stream), "tokens": tokens, "total_ms": total_ms,
            "tokens_per_s": tokens / (total_ms / 1e3), "p50_ms": percentile(ranked, 0.5),
            "p95_ms": percentile(ranked, 0.95), "p99_ms": percentile(ranked, 0.99),
            "decode_p50_ms": statistics.median(latencies["decode"]) if latencies["decode"] else None,
            "prefill_p50_ms": statistics.median(latencies["prefill"]) if latencies["prefill"] else None,
        })  # fmt: skip
        progress.step(name)
    return results


def _replay(system, case: MoECase, views: dict, stream: list[tuple[str, int]], device: torch.device):
    system.prepare(case)

    def call():
        with torch.no_grad():
            return system()

    for view in views.values():  # warm-up: every size once
        system.case = view
        call()
    latencies: dict[str, list[float]] = {"decode": [], "prefill": []}
    ordered = []
    for kind, tokens in stream:
        system.case = views[tokens]
        ms = time_ms(call, device, warmup=0, repeat=1)[0]
        latencies[kind].append(ms)
        ordered.append(ms)
    return latencies, ordered
