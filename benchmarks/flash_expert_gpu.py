"""GPU check and timing of ``moeflux.ops.flash_expert`` (Triton) against eager PyTorch.

    PYTHONPATH=src python3 benchmarks/flash_expert_gpu.py --out $OUT [--sweep] [--shapes H:K:E,...]

1. Correctness: Triton forward and all four gradients against a float32 PyTorch reference
   (float32 and bfloat16, deterministic and atomic weight gradients, a hot expert, a pool of
   E * H > 2**31 elements, and non-default configs: token-order forward, weight gradients
   looping over H, one-stage loops); rel-L2 errors are printed; exit status 1 if any fails.
2. Copy bandwidth: one large device-to-device copy, (bytes read + written) / time.
3. Timing (bfloat16, T = 8192, H in {1024, 2048}, K in {16, 64}, E in {65536, 1048576}):
   forward and forward+backward, medians of ``triton.testing.do_bench``, each call launched
   from Python and (``graph``) replayed from a CUDA graph, which leaves out the host's cost of
   launching (at ``K = 16``, ``E = 65536`` the backward's launches take longer on the host than
   its kernels on the device), for
   * ``triton``: moeflux's kernels, default config (deterministic backward; atomic as well);
   * ``eager``: ``moeflux.ops.flash_expert.naive`` (gathers rows, computes in float32);
   * ``eager_bf16``: the same gather with bf16 ``bmm`` (no float32 copies), a leaner baseline.
   Forward bytes = K gathered rows of both pools per token + input + output. ``grad write
   floor``: the dense gradients' compulsory write, ``2 E H`` elements at the copy bandwidth.
   ``fwd+bwd floor``: all compulsory traffic (forward bytes; the backward's K gathered rows
   of both pools again, grad_out, hidden, d_hidden, and the ``2 E H`` gradient writes) at
   the copy bandwidth; ``speed-up bound`` = eager fwd+bwd / that floor.
4. ``--sweep``: per shape, each kernel alone under a handful of tile configs (the same
   inputs, one kernel launch per timing), the best per kernel, then the whole op with the
   best tiles against the default, and the forward with and without the expert sort.
   It prints a ``default_config`` suggestion per shape.
5. A Markdown table on stdout, JSON (and the tables) under ``--out``.

``--smoke`` runs tiny shapes (also on the CPU with TRITON_INTERPRET=1) to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from _common import graph_replay, pick_device, rel_l2, report_path, run_info
import torch
import torch.nn.functional as F
import triton

from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.flash_expert import triton as kernels
from moeflux.ops.flash_expert.naive import flash_expert_torch
from moeflux.ops.flash_expert.triton import Tiles

TIME_BUDGET_S = 330.0  # stop starting eager timings after this
SWEEP_BUDGET_S = 240.0  # stop starting sweep shapes after this (the whole run stays < 5 min)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_inputs(T, H, E, K, dtype, device, *, hot=False, requires_grad=False, seed=0):
    """Fresh random inputs with uniform ``torch.randint`` expert ids (never zeros)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=generator)
    down = torch.randn(E, H, device=device, dtype=dtype, generator=generator).mul_(H**-0.5)
    up = torch.randn(E, H, device=device, dtype=dtype, generator=generator)
    indices = torch.randint(0, E, (T, K), device=device, generator=generator)
    if hot:
        indices[:, 0] = 3  # every token's first slot: one expert with a T-long segment
        indices[:, -1] = E - 1  # the last row of the pool: the largest offsets
        indices[::2, 1] = indices[::2, 0]  # the same expert twice in one token
    routing_weights = torch.softmax(torch.randn(T, K, device=device, generator=generator), dim=-1)
    tensors = [hidden, down, up, routing_weights]
    if requires_grad:
        for t in tensors:
            t.requires_grad_()
    return hidden, down, up, indices, routing_weights


# --------------------------------------------------------------------------------------
# 1. correctness
# --------------------------------------------------------------------------------------


def reference_float32(hidden, down, up, indices, routing_weights, grad_out):
    """Forward and gradients in float32 through the torch path, on the pool rows actually
    used (a compact copy), so it fits beside pools of a million rows."""
    used, compact_indices = torch.unique(indices, return_inverse=True)
    leaves = [t.detach().float().requires_grad_() for t in (hidden, down[used], up[used], routing_weights)]
    out = flash_expert_torch(leaves[0], leaves[1], leaves[2], compact_indices, leaves[3])
    out.backward(grad_out.float())
    return used, out.detach(), *(leaf.grad for leaf in leaves)


def check_case(name, T, H, E, K, dtype, deterministic, device, *, hot, config=None):
    hidden, down, up, indices, routing_weights = make_inputs(T, H, E, K, dtype, device, hot=hot)
    grad_out = torch.randn(T, H, device=device, dtype=dtype)
    used, *expected = reference_float32(hidden, down, up, indices, routing_weights, grad_out)

    def triton_run():
        leaves = [t.detach().requires_grad_() for t in (hidden, down, up, routing_weights)]
        out = flash_expert(
            *leaves[:3], indices, leaves[3], backend="triton", deterministic=deterministic, config=config
        )
        out.backward(grad_out)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    actual = triton_run()
    unused = torch.ones(E, dtype=torch.bool, device=device)
    unused[used] = False
    unused_rows_zero = all(not g.ne(0).any(dim=1)[unused].any() for g in actual[2:4])
    actual[2], actual[3] = actual[2][used], actual[3][used]
    names = ("out", "d_hidden", "d_down", "d_up", "d_routing")
    errors = {n: rel_l2(a, e) for n, a, e in zip(names, actual, expected)}
    finite = all(bool(torch.isfinite(a).all()) for a in actual)
    reproducible = None
    if deterministic:
        again = triton_run()
        again[2], again[3] = again[2][used], again[3][used]
        reproducible = all(torch.equal(a, b) for a, b in zip(actual, again))
    ok = (
        finite
        and unused_rows_zero
        and all(e < TOLERANCE[dtype] for e in errors.values())
        and reproducible is not False
    )
    return {
        "case": name, "T": T, "H": H, "E": E, "K": K, "dtype": str(dtype).removeprefix("torch."),
        "deterministic": deterministic, "rel_l2": errors, "finite": finite,
        "unused_rows_zero": unused_rows_zero, "bitwise_reproducible": reproducible,
        "tolerance": TOLERANCE[dtype], "ok": ok,
    }  # fmt: skip


def variant_config(H, K, dtype, variant):
    """Non-default configs the sweep may pick, so that the GPU checks cover them."""
    config = kernels.default_config(H, K, dtype)
    if variant == "dots in expert order, weight grads walk H":
        return config.replace(sorted_dots=True, expert_grads=config.expert_grads._replace(h_loop=True))
    if variant == "one-stage loops, stepping weight grads":
        return config.replace(
            token_dot=Tiles(1, 64, 4, 1), sorted_dot=Tiles(8, 128, 4, 1), combine=Tiles(4, 128, 4, 1),
            expert_grads=Tiles(8, 64, 4, 1, False, 0),
        )  # fmt: skip
    return None


def run_checks(device, smoke):
    variants = ["dots in expert order, weight grads walk H", "one-stage loops, stepping weight grads"]
    if smoke:
        cases = [("uniform", 16, 40, 50, 3, False, None), ("hot + duplicates", 24, 33, 20, 4, True, None)]
        cases += [(v, 12, 40, 30, 3, True, v) for v in variants]
    else:
        cases = [
            ("uniform", 512, 1024, 4096, 16, False, None),
            ("hot expert + duplicates, H = 1000", 4096, 1000, 1000, 8, True, None),
            ("E * H > 2**31 (int64 offsets)", 256, 2048, 1 << 20, 16, True, None),
        ]
        cases += [(v, 1024, 1000, 2000, 8, True, v) for v in variants]
    results = []
    for name, T, H, E, K, hot, variant in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for deterministic in (True, False):
                config = variant_config(H, K, dtype, variant)
                try:
                    result = check_case(name, T, H, E, K, dtype, deterministic, device, hot=hot, config=config)
                except Exception as error:  # a failed compile or launch is a failed check
                    result = {"case": name, "dtype": str(dtype), "deterministic": deterministic,
                              "ok": False, "error": f"{type(error).__name__}: {error}"}  # fmt: skip
                results.append(result)
                errors = " ".join(f"{k}={v:.1e}" for k, v in result.get("rel_l2", {}).items())
                mode = "sorted" if deterministic else "atomic"
                status = "ok  " if result["ok"] else "FAIL"
                error = result.get("error", "")
                print(f"[check {status}] {name[:44]:44s} {result['dtype']:9s} {mode:6s} {errors} {error}")
                sys.stdout.flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------
# 2. + 3. timing
# --------------------------------------------------------------------------------------


def time_ms(fn, grad_to_none=None, quick=False) -> float:
    """Median ms (do_bench; ``quick``: 5 ms warm-up, 25 ms of repetitions, for the sweep)."""
    if torch.cuda.is_available():
        extra = dict(warmup=5, rep=25) if quick else {}
        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median", **extra))
    fn()  # CPU smoke run: a few plain repetitions
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        for t in grad_to_none or ():
            t.grad = None
    return 1e3 * sorted(times)[1]


def copy_bandwidth_gbps(device, smoke) -> float:
    numel = (1 << 20) if smoke else (1 << 29)  # 2 GiB of float32 each way
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def eager_bf16(hidden, down, up, indices, routing_weights):
    """Gather + bmm in the input dtype (cuBLAS accumulates in float32, rounds scores to bf16)."""
    down_rows, up_rows = down[indices], up[indices]  # [T, K, H]
    scores = torch.bmm(down_rows, hidden.unsqueeze(-1)).squeeze(-1)  # [T, K]
    coef = (F.silu(scores.float()) * routing_weights).to(hidden.dtype)
    return torch.bmm(coef.unsqueeze(1), up_rows).squeeze(1)


IMPLEMENTATIONS = {
    "triton": lambda *a: flash_expert(*a, check_indices=False, backend="triton"),
    "triton_atomic": lambda *a: flash_expert(*a, check_indices=False, backend="triton", deterministic=False),
    "eager": flash_expert_torch,
    "eager_bf16": eager_bf16,
}


def measure(impl, inputs, grad_out, backward, graph=False):
    """Median ms of the forward (``backward`` False) or a training step. ``graph``: the step
    captured in a CUDA graph and replayed, so the time is the device's alone."""
    hidden, down, up, indices, routing_weights = inputs
    leaves = [hidden, down, up, routing_weights]
    fn = IMPLEMENTATIONS[impl]
    if not backward:

        def forward():
            with torch.no_grad():
                fn(hidden, down, up, indices, routing_weights)

        return time_ms(graph_replay(forward) if graph else forward)
    if graph:

        def step():
            torch.autograd.grad(fn(hidden, down, up, indices, routing_weights), leaves, grad_out)

        return time_ms(graph_replay(step))

    def forward_backward():
        fn(hidden, down, up, indices, routing_weights).backward(grad_out)

    return time_ms(forward_backward, grad_to_none=leaves)


MEASUREMENTS = [  # (implementation, with backward, as a CUDA graph)
    ("triton", False, False), ("triton", False, True), ("triton", True, False), ("triton", True, True),
    ("triton_atomic", True, False), ("eager", False, False), ("eager", True, False), ("eager", True, True),
    ("eager_bf16", False, False), ("eager_bf16", True, False),
]  # fmt: skip


def timing_grid(smoke):
    if smoke:
        return [(16, 32, 4, 64), (16, 32, 4, 8)]
    return [(8192, H, K, E) for H in (1024, 2048) for K in (16, 64) for E in (1 << 16, 1 << 20)]


def run_timings(device, copy_gbps, smoke, started, grid=None):
    dtype = torch.bfloat16
    element = torch.finfo(dtype).bits // 8
    rows = []
    for T, H, K, E in grid or timing_grid(smoke):
        inputs = make_inputs(T, H, E, K, dtype, device, requires_grad=True, seed=1)
        grad_out = torch.randn(T, H, device=device, dtype=dtype)
        forward_bytes = T * K * H * 2 * element + 2 * T * H * element
        # Compulsory traffic of the backward: both pools' gathered rows again, grad_out and
        # hidden read, d_hidden written, and the dense [E, H] gradients of both pools written
        # whole. No implementation that reads each gathered row once per pass beats it.
        grad_write_bytes = 2 * E * H * element
        backward_bytes = T * K * H * 2 * element + 3 * T * H * element + grad_write_bytes
        to_ms = 1e3 / (copy_gbps * 1e9)
        floor_ms = (forward_bytes + backward_bytes) * to_ms
        row = {"T": T, "H": H, "K": K, "E": E, "dtype": "bfloat16", "forward_bytes": forward_bytes,
               "backward_bytes": backward_bytes, "grad_write_floor_ms": grad_write_bytes * to_ms,
               "fwd_bwd_floor_ms": floor_ms}  # fmt: skip
        for impl, backward, graph in MEASUREMENTS:
            if graph and device.type != "cuda":
                continue
            key = f"{impl}_{'fwd_bwd' if backward else 'fwd'}{'_graph' if graph else ''}_ms"
            if impl.startswith("eager") and time.perf_counter() - started > TIME_BUDGET_S:
                row[key] = None
                row[f"{key}_error"] = "skipped: time budget"
                continue
            try:
                row[key] = measure(impl, inputs, grad_out, backward, graph)
            except Exception as error:  # out of memory, or a kernel that fails: note it, go on
                row[key] = None
                row[f"{key}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            for t in inputs:
                t.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # Bandwidth from the device's time (the graph replay) where there is one.
        fwd_ms = row.get("triton_fwd_graph_ms") or row["triton_fwd_ms"]
        if fwd_ms:
            row["triton_fwd_GBps"] = forward_bytes / (fwd_ms * 1e-3) / 1e9
            row["triton_fwd_pct_of_copy"] = 100 * row["triton_fwd_GBps"] / copy_gbps
        for baseline in ("eager", "eager_bf16"):
            for phase in ("fwd", "fwd_bwd"):
                mine, theirs = row.get(f"triton_{phase}_ms"), row.get(f"{baseline}_{phase}_ms")
                row[f"speedup_{phase}_vs_{baseline}"] = theirs / mine if mine and theirs else None
        # Both sides replayed from CUDA graphs: device time against device time.
        mine, theirs = row.get("triton_fwd_bwd_graph_ms"), row.get("eager_fwd_bwd_graph_ms")
        row["speedup_fwd_bwd_graph_vs_eager"] = theirs / mine if mine and theirs else None
        eager_ms = row.get("eager_fwd_bwd_graph_ms") or row.get("eager_fwd_bwd_ms")
        if eager_ms:
            # The best any implementation at the floor could show against eager here.
            row["max_speedup_fwd_bwd_vs_eager"] = eager_ms / floor_ms
        rows.append(row)
        print(markdown_row(row))
        sys.stdout.flush()
        del inputs, grad_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


HEADER = (
    "| T | H | K | E | triton fwd ms (graph) | GB/s | % copy | eager fwd ms | speed-up | eager_bf16 fwd ms "
    "| speed-up | triton fwd+bwd ms | (graph) | atomic | eager fwd+bwd ms | (graph) | speed-up | speed-up (graphs) "
    "| eager_bf16 fwd+bwd ms | speed-up | grad write floor ms | fwd+bwd floor ms | speed-up bound |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(row) -> str:
    def f(key, spec=".3f", suffix=""):
        value = row.get(key)
        return "n/a" if value is None else f"{value:{spec}}{suffix}"

    return (
        f"| {row['T']} | {row['H']} | {row['K']} | {row['E']} | {f('triton_fwd_ms')} ({f('triton_fwd_graph_ms')}) "
        f"| {f('triton_fwd_GBps', '.0f')} | {f('triton_fwd_pct_of_copy', '.0f', '%')} | {f('eager_fwd_ms')} "
        f"| {f('speedup_fwd_vs_eager', '.1f', 'x')} | {f('eager_bf16_fwd_ms')} "
        f"| {f('speedup_fwd_vs_eager_bf16', '.1f', 'x')} | {f('triton_fwd_bwd_ms')} | {f('triton_fwd_bwd_graph_ms')} "
        f"| {f('triton_atomic_fwd_bwd_ms')} | {f('eager_fwd_bwd_ms')} | {f('eager_fwd_bwd_graph_ms')} "
        f"| {f('speedup_fwd_bwd_vs_eager', '.1f', 'x')} | {f('speedup_fwd_bwd_graph_vs_eager', '.1f', 'x')} "
        f"| {f('eager_bf16_fwd_bwd_ms')} | {f('speedup_fwd_bwd_vs_eager_bf16', '.1f', 'x')} "
        f"| {f('grad_write_floor_ms')} | {f('fwd_bwd_floor_ms')} | {f('max_speedup_fwd_bwd_vs_eager', '.1f', 'x')} |"
    )


# --------------------------------------------------------------------------------------
# 4. tile sweep
# --------------------------------------------------------------------------------------


def sweep_candidates(kernel, H, K, smoke):
    """A handful of tiles per kernel: the default's neighbours in rows, block_h, warps and
    stages (each Tiles(rows, block_h, num_warps, num_stages, h_loop))."""
    if kernel == "token_dot":
        block_k = max(2, triton.next_power_of_2(K))
        # (elements per step, block_h, warps, stages): rows = elements / (block_k * block_h)
        shapes = [(8192, 256, 8, 3), (4096, 256, 4, 3), (4096, 128, 4, 4), (8192, 512, 8, 3),
                  (8192, 128, 8, 3), (8192, 256, 8, 4), (4096, 64, 4, 4), (4096, 256, 4, 1)]  # fmt: skip
        found = []
        for elements, block_h, warps, stages in shapes:
            block_h = max(16, min(block_h, elements // block_k))
            tiles = Tiles(max(1, elements // (block_k * block_h)), block_h, warps, stages)
            if tiles not in found:
                found.append(tiles)
    elif kernel == "sorted_dot":
        found = [Tiles(16, 256, 8, 3), Tiles(16, 128, 4, 4), Tiles(8, 256, 4, 4), Tiles(8, 512, 4, 3),
                 Tiles(32, 128, 4, 3), Tiles(16, 256, 8, 4), Tiles(32, 256, 8, 3), Tiles(16, 256, 8, 1)]  # fmt: skip
    elif kernel == "combine":
        found = [Tiles(16, 256, 4, 3), Tiles(16, 256, 4, 4), Tiles(8, 256, 4, 4), Tiles(8, 512, 4, 3),
                 Tiles(32, 128, 4, 3), Tiles(16, 128, 4, 4), Tiles(4, 512, 4, 4), Tiles(16, 256, 4, 1),
                 Tiles(32, 256, 8, 3)]  # fmt: skip
    else:  # Tiles(rows, block_h, warps, stages, h_loop, block_p): block_p > 0 = tensor cores
        found = [Tiles(32, 64, 4, 3, False, 32), Tiles(32, 64, 4, 3, True, 32), Tiles(64, 64, 4, 2, None, 16),
                 Tiles(64, 64, 4, 3, None, 16), Tiles(32, 64, 4, 2, None, 16), Tiles(128, 64, 8, 2, None, 16),
                 Tiles(64, 64, 8, 2, None, 32), Tiles(16, 64, 4, 3, None, 32), Tiles(32, 128, 4, 3, None, 32),
                 Tiles(16, 128, 4, 2, False, 0), Tiles(16, 128, 4, 3, False, 0),
                 Tiles(16, 64, 4, 2, True, 0), Tiles(32, 128, 4, 2, None, 16), Tiles(32, 128, 8, 2, None, 16),
                 Tiles(32, 256, 8, 2, None, 16), Tiles(16, 128, 4, 2, None, 16), Tiles(16, 256, 8, 2, None, 16),
                 Tiles(32, 64, 2, 2, None, 16), Tiles(16, 64, 2, 2, None, 16), Tiles(32, 64, 4, 4, None, 16),
                 Tiles(32, 64, 4, 2, True, 16), Tiles(64, 128, 8, 2, None, 16), Tiles(32, 128, 4, 2, None, 32),
                 Tiles(16, 128, 4, 3, None, 16), Tiles(16, 128, 4, 2, True, 16),
                 Tiles(16, 256, 4, 2, None, 16), Tiles(16, 128, 2, 2, None, 16), Tiles(16, 128, 4, 2, None, 32),
                 Tiles(16, 128, 8, 2, None, 16), Tiles(16, 128, 4, 1, None, 16), Tiles(16, 128, 2, 3, None, 16),
                 Tiles(16, 128, 2, 1, None, 16), Tiles(16, 256, 4, 1, None, 16), Tiles(32, 128, 4, 1, None, 16),
                 Tiles(16, 64, 4, 1, None, 16), Tiles(16, 128, 8, 1, None, 16), Tiles(16, 128, 4, 1, True, 16),
                 Tiles(16, 128, 4, 1, None, 32), Tiles(16, 256, 8, 1, None, 16), Tiles(32, 64, 4, 1, None, 16),
                 Tiles(64, 64, 4, 1, None, 16), Tiles(16, 128, 4, 1, False, 0)]  # fmt: skip
    return found[:2] if smoke else found


SWEPT = ("token_dot", "sorted_dot", "combine", "expert_grads")


def sweep_kernels(inputs, grad_out, pairs, base, copy_gbps, smoke, swept=SWEPT):
    """Each kernel alone under its candidate tiles (one launch per timing, on its own
    buffers, freed on return): ``({kernel: results}, {kernel: fastest tiles})``."""
    hidden, down, up, indices, routing_weights = inputs
    T, H = hidden.shape
    E, K = down.shape[0], indices.shape[1]
    element = hidden.element_size()
    device = hidden.device
    starts = kernels.expert_starts(pairs, E)
    distinct = int(torch.unique(indices).numel())
    scores = torch.empty(T, K, device=device, dtype=torch.float32)
    coef = torch.empty(T, K, device=device, dtype=torch.float32)
    grad_score = torch.randn(T, K, device=device) * 0.1
    out = torch.empty(T, H, device=device, dtype=hidden.dtype)
    grad_down, grad_up = torch.empty_like(down), torch.empty_like(up)
    P = T * K
    work = {  # kernel: (one launch under a config, compulsory bytes)
        "token_dot": (lambda c: kernels.launch_dots(hidden, down, indices, routing_weights, scores, coef, config=c),
                      (P + T) * H * element),
        "sorted_dot": (lambda c: kernels.launch_dots(hidden, down, indices, routing_weights, scores, coef,
                                                     pairs=pairs, config=c), (distinct + T) * H * element),
        "combine": (lambda c: kernels.launch_combine(up, indices, coef, out, config=c), (P + T) * H * element),
        "expert_grads": (lambda c: kernels.launch_expert_grads(hidden, grad_out, pairs, grad_score, coef, grad_down,
                                                               grad_up, starts=starts, config=c),
                         2 * (E + T) * H * element),
    }  # fmt: skip
    results, best = {"distinct_experts": distinct}, {}
    for kernel in swept:
        launch, nbytes = work[kernel]
        default_tiles = getattr(base, kernel)
        candidates = sweep_candidates(kernel, H, K, smoke)
        if default_tiles not in candidates:
            candidates = [default_tiles, *candidates]
        timings = []
        for tiles in candidates:
            try:
                ms = time_ms(lambda c=base.replace(**{kernel: tiles}): launch(c), quick=True)
                timings.append({"tiles": list(tiles), "ms": ms, "GBps": nbytes / (ms * 1e-3) / 1e9})
            except Exception as error:  # out of resources, compile failure: note it, go on
                timings.append({"tiles": list(tiles), "ms": None, "error": f"{type(error).__name__}: {error}"[:300]})
        ok = [t for t in timings if t["ms"] is not None]
        fastest = min(ok, key=lambda t: t["ms"]) if ok else None
        best[kernel] = Tiles(*fastest["tiles"]) if fastest else default_tiles
        default_ms = next((t["ms"] for t in timings if t["tiles"] == list(default_tiles)), None)
        results[kernel] = {"bytes": nbytes, "default": list(default_tiles), "default_ms": default_ms,
                           "best": fastest, "all": timings}  # fmt: skip
        ranked = sorted(ok, key=lambda t: t["ms"])
        listing = "  ".join(f"{tuple(t['tiles'])}:{t['ms']:.3f}" for t in ranked[:4])
        failed = len(timings) - len(ok)
        print(
            f"  {kernel:12s} default {fmt_ms(default_ms)} ms -> best {fmt_ms(fastest and fastest['ms'])} ms "
            f"({pct(fastest and fastest['GBps'], copy_gbps)} of copy on {nbytes / 1e9:.2f} GB)  top: {listing}"
            + (f"  [{failed} failed]" if failed else "")
        )
        sys.stdout.flush()
    return results, best


def sweep_shape(T, H, K, E, device, copy_gbps, smoke, swept=SWEPT):
    """Time each kernel alone under its candidate tiles, then the whole op with the best."""
    dtype = torch.bfloat16
    element = 2
    hidden, down, up, indices, routing_weights = make_inputs(T, H, E, K, dtype, device, seed=2)
    grad_out = torch.randn(T, H, device=device, dtype=dtype)
    pairs = kernels.sort_pairs(indices)
    base = kernels.default_config(H, K, dtype)
    found, best = sweep_kernels((hidden, down, up, indices, routing_weights), grad_out, pairs, base, copy_gbps, smoke,
                                swept)  # fmt: skip
    shape = {"T": T, "H": H, "K": K, "E": E, "distinct_experts": found.pop("distinct_experts"), "kernels": found}

    # Floors and the sort, for scale.
    shape["sort_ms"] = time_ms(lambda: kernels.sort_pairs(indices), quick=True)
    shape["expert_starts_ms"] = time_ms(lambda: kernels.expert_starts(pairs, E), quick=True)
    shape["zero_grads_ms"] = time_ms(lambda: (torch.zeros_like(down), torch.zeros_like(up)), quick=True)

    # The whole op: default tiles vs the best, and the forward in token vs expert order.
    tuned = base.replace(**best)
    sorted_tuned = tuned.replace(sorted_dots=True)
    leaves = [t.requires_grad_() for t in (hidden, down, up, routing_weights)]

    def forward(config):
        with torch.no_grad():
            flash_expert(hidden, down, up, indices, routing_weights, check_indices=False, backend="triton",
                         config=config)  # fmt: skip

    def forward_backward(config):
        flash_expert(hidden, down, up, indices, routing_weights, check_indices=False, backend="triton",
                     config=config).backward(grad_out)  # fmt: skip

    full = {
        "fwd_default_ms": lambda: time_ms(lambda: forward(base), quick=True),
        "fwd_best_ms": lambda: time_ms(lambda: forward(tuned), quick=True),
        "fwd_best_expert_order_ms": lambda: time_ms(lambda: forward(sorted_tuned), quick=True),
        "fwd_bwd_default_ms": lambda: time_ms(lambda: forward_backward(base), grad_to_none=leaves, quick=True),
        "fwd_bwd_best_ms": lambda: time_ms(lambda: forward_backward(tuned), grad_to_none=leaves, quick=True),
        "fwd_bwd_best_expert_order_ms": lambda: time_ms(
            lambda: forward_backward(sorted_tuned), grad_to_none=leaves, quick=True
        ),
    }
    for key, measure_fn in full.items():
        try:
            shape[key] = measure_fn()
        except Exception as error:
            shape[key] = None
            shape[f"{key}_error"] = f"{type(error).__name__}: {error}"[:300]
        for leaf in leaves:
            leaf.grad = None
    forward_bytes = T * K * H * 2 * element + 2 * T * H * element
    expert_order = (shape["fwd_bwd_best_expert_order_ms"] or math.inf) < (shape["fwd_bwd_best_ms"] or math.inf)
    shape["best_config"] = {**{k: list(v) for k, v in best.items()}, "sorted_dots": expert_order}
    print(
        f"  whole op: fwd default {fmt_ms(shape['fwd_default_ms'])} / best {fmt_ms(shape['fwd_best_ms'])} ms "
        f"({pct(shape['fwd_best_ms'] and forward_bytes / (shape['fwd_best_ms'] * 1e-3) / 1e9, copy_gbps)} of copy), "
        f"expert order {fmt_ms(shape['fwd_best_expert_order_ms'])} ms incl. sort {fmt_ms(shape['sort_ms'])}; "
        f"fwd+bwd default {fmt_ms(shape['fwd_bwd_default_ms'])} / best {fmt_ms(shape['fwd_bwd_best_ms'])} / "
        f"expert order {fmt_ms(shape['fwd_bwd_best_expert_order_ms'])} ms; zeroing both grads "
        f"{fmt_ms(shape['zero_grads_ms'])} ms, expert starts {fmt_ms(shape['expert_starts_ms'])} ms"
    )
    tiles = ", ".join(f"{k}={tuple(v)}" for k, v in best.items())
    print(f"  suggested (H={H}, K={K}): {tiles}, sorted_dots={expert_order}")
    sys.stdout.flush()
    return shape


def fmt_ms(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pct(gbps, copy_gbps) -> str:
    return "n/a" if not gbps or not copy_gbps else f"{100 * gbps / copy_gbps:.0f}%"


def sweep_markdown(shapes) -> str:
    """Per shape: each kernel's default and best ms with the best tiles, and the whole op."""
    lines = ["\n## tile sweep\n", "| H | K | E | kernel | default ms | best ms | best tiles |"]
    lines.append("|---|---|---|---|---|---|---|")
    for shape in shapes:
        for kernel, found in shape.get("kernels", {}).items():
            best = found["best"] or {}
            lines.append(
                f"| {shape['H']} | {shape['K']} | {shape['E']} | {kernel} | {fmt_ms(found['default_ms'])} "
                f"| {fmt_ms(best.get('ms'))} | {tuple(best.get('tiles', ()))} |"
            )
        whole = ("fwd_default_ms", "fwd_best_ms", "fwd_best_expert_order_ms", "fwd_bwd_default_ms", "fwd_bwd_best_ms",
                 "fwd_bwd_best_expert_order_ms")  # fmt: skip
        summary = ", ".join(f"{key.removesuffix('_ms')} {fmt_ms(shape.get(key))}" for key in whole)
        lines.append(f"| {shape['H']} | {shape['K']} | {shape['E']} | whole op | | | {summary} |")
    return "\n".join(lines) + "\n"


def run_sweep(device, copy_gbps, smoke, started, grid=None, swept=SWEPT):
    shapes = []
    for T, H, K, E in grid or timing_grid(smoke):
        if time.perf_counter() - started > SWEEP_BUDGET_S:
            print(f"[sweep] time budget reached, skipping T={T} H={H} K={K} E={E}")
            continue
        print(f"[sweep] T={T} H={H} K={K} E={E}")
        try:
            shapes.append(sweep_shape(T, H, K, E, device, copy_gbps, smoke, swept))
        except Exception as error:  # one shape failing must not lose the others
            print(f"  failed: {type(error).__name__}: {error}")
            shapes.append({"T": T, "H": H, "K": K, "E": E, "error": f"{type(error).__name__}: {error}"[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder (or .json path) for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself")
    parser.add_argument("--skip-checks", action="store_true", help="no correctness checks (for a tile sweep)")
    parser.add_argument("--skip-timing", action="store_true", help="no timing table (a --sweep still runs)")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tiles per kernel and shape")
    parser.add_argument("--sweep-kernels", default=",".join(SWEPT), help="comma-separated kernels to sweep")
    parser.add_argument("--shapes", default=None, help="comma-separated H:K:E (T = 8192) instead of the full grid")
    args = parser.parse_args()
    grid = None
    if args.shapes:
        grid = [(8192, *(int(v) for v in item.split(":"))) for item in args.shapes.split(",")]
    started = time.perf_counter()
    picked = pick_device(args.smoke)
    if picked is None:
        return 2
    device, gpu = picked

    print(f"# flash_expert on {gpu}; torch {torch.__version__}, triton {triton.__version__}\n")
    checks = [] if args.skip_checks else run_checks(device, args.smoke)
    checks_ok = None if args.skip_checks else all(c["ok"] for c in checks)
    verdict = {None: "skipped", True: "all passed", False: "FAILURES"}[checks_ok]
    print(f"\ncorrectness: {verdict} ({time.perf_counter() - started:.0f} s)\n")

    report = {
        **run_info(gpu),
        "checks_ok": checks_ok,
        "checks": checks,
        "copy_bandwidth_GBps": None,
        "timing_note": "medians of triton.testing.do_bench; bfloat16; uniform torch.randint expert ids",
        "results": [],
        "sweep": None,
    }
    json_path = report_path(args.out, "flash_expert_gpu.json")

    def write_report():  # after each phase, so a later failure keeps what came before
        report["wall_s"] = time.perf_counter() - started
        json_path.write_text(json.dumps(report, indent=2))
        table = "\n".join([HEADER, *(markdown_row(r) for r in report["results"])])
        copy = report["copy_bandwidth_GBps"]
        sweep = sweep_markdown(report["sweep"]) if report["sweep"] else ""
        json_path.with_suffix(".md").write_text(f"flash_expert on {gpu}, copy {copy} GB/s\n\n{table}\n{sweep}")

    write_report()
    if not args.skip_timing or args.sweep:
        copy_gbps = copy_bandwidth_gbps(device, args.smoke)
        report["copy_bandwidth_GBps"] = copy_gbps
        print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)\n")
    if not args.skip_timing:
        print(HEADER)
        report["results"] = run_timings(device, copy_gbps, args.smoke, started, grid)
        write_report()
    if args.sweep:
        print(f"\n# tile sweep ({time.perf_counter() - started:.0f} s so far)")
        report["sweep"] = run_sweep(device, copy_gbps, args.smoke, started, grid,
                                    tuple(args.sweep_kernels.split(",")))  # fmt: skip
        write_report()
    print(f"\nwrote {json_path} ({report['wall_s']:.0f} s)")
    return 1 if checks_ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
