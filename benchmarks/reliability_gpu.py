"""GPU reliability checks (issue #10): large indices, determinism, CUDA graphs, streams, memory.

    PYTHONPATH=src python3 benchmarks/reliability_gpu.py --out $OUT
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/reliability_gpu.py --smoke --out /tmp/r   # CPU, tiny

Each check passes or fails on numbers it reports; the run writes ``reliability_gpu.json`` and a
Markdown table under ``--out`` and exits 1 if any check fails. On an H100 it takes about
1.5-2.5 minutes (mostly kernel compiles), under 30 GB of GPU memory at its peak.

1. ``large-index-layer-{bf16,fp16}``: the Triton layer (``moeflux.moe``, router included) at
   T = 65,536, k = 8, H = 7168, D = 64, E = 16, where the ``[P, H]`` pair rows hold
   ``T k H = 3.8e9 > 2**31`` elements; sampled rows (first, last, random) against the torch
   path and a float32 reference. bfloat16 also runs the backward (``experts_autograd``): dx and
   the routing-weight gradients on the sampled tokens against float32 autograd, the weight
   gradients against the sum of the same backward over 8,192-token chunks (offsets < 2**31).
2. ``large-index-weights``: ``gate_up`` of ``E H 2D = 3.8e9 > 2**31`` elements (E = 64,
   H = 7168, D = 4096, T = 2048, k = 8): output rows and the weight gradients of the first and
   last expert (offset past 2**31) against float32 autograd.
3. ``large-index-flash``: ``flash_expert`` with pools of ``E H = 2.5e9 > 2**31`` elements
   (E = 1.2M, H = 2048, K = 16, T = 4096): output and all gradients against float32 autograd
   on the picked rows; unpicked rows' gradients exactly zero.
4. ``determinism-*``: the layer (Triton, bfloat16, T = 4096, E = 128, k = 8, one shared expert)
   forward + backward twice: output and every gradient bitwise equal; the flash expert
   (deterministic weight gradients) likewise. The atomic flash path is reported (not judged).
5. ``cuda-graph-*``: the layer forward, and forward + backward (``torch.autograd.grad``),
   captured in a CUDA graph, replayed after copying new inputs in: bitwise equal to eager on
   the new inputs. The flash expert forward + backward likewise.
6. ``stream``: layer and flash expert forward + backward on a non-default stream: bitwise equal
   to the default stream.
7. ``memory-*``: a request that cannot fit (10M tokens at the competition's shape, expanded
   inputs) raises ``torch.OutOfMemoryError`` naming the bytes, with nothing allocated; every
   estimate of ``moeflux.memory`` bounds ``torch.cuda.max_memory_allocated`` of its call (the
   shapes of 4.); the free-memory query's cost.
8. ``deterministic-algorithms``: under ``torch.use_deterministic_algorithms(True)`` (which
   also fills ``torch.empty`` with NaN: unwritten memory shows; ``CUBLAS_WORKSPACE_CONFIG`` is
   set for the router's cuBLAS matmul, as PyTorch requires) the layer runs forward and
   backward on both backends (the Triton one bitwise as without the setting), and
   ``flash_expert(deterministic=False)`` warns and falls back to the sorted reduction.
9. ``odd-shapes``: odd H = 1023, D = 257 and an input 2 bytes off alignment: output and
   gradients against float32 autograd, torch path alongside.
10. ``empty-experts``: only 32 of 128 experts receive tokens, under NaN-filled ``torch.empty``:
    finite outputs, exactly zero weight gradients for the other 96, no hang.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from unittest import mock

# torch.use_deterministic_algorithms(True) refuses cuBLAS matmuls (the router's) without a fixed
# cuBLAS workspace; it must be set before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from _common import capture, pick_device, rel_l2, report_path, run_info, write_report
import torch
import torch.nn.functional as F
import triton

import moeflux
from moeflux import memory
from moeflux.ops.experts.autograd import experts_autograd
from moeflux.ops.experts.naive import experts_torch
from moeflux.ops.experts.triton import experts_triton
from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.flash_expert.naive import flash_expert_torch

# rel-L2 bounds against float32 (the Triton path rounds once per stage, like the torch path).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


class Context:
    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sample_rows(T: int, device, count: int = 256) -> torch.Tensor:
    """The first and last ``count // 4`` rows and ``count // 2`` random ones, sorted, unique."""
    edge = min(count // 4, T)
    rows = [torch.arange(edge), torch.arange(T - edge, T), torch.randint(0, T, (count // 2,), generator=torch.Generator().manual_seed(1))]
    return torch.cat(rows).unique().to(device)


def swiglu_rows_f32(x, expert_ids, expert_weights, gate_up, down, num_routed, tokens):
    """Float32 ``sum_j w SwiGLU_e(x) (+ shared)`` for the rows ``tokens`` only, expert by expert
    (each expert's weights converted once)."""
    xs, ids, ws = x[tokens].float(), expert_ids[tokens], expert_weights[tokens].float()
    D = down.shape[1]
    out = torch.zeros(xs.shape, device=x.device, dtype=torch.float32)
    for e in range(down.shape[0]):
        if e < num_routed:
            row, slot = (ids == e).nonzero(as_tuple=True)
            scale = ws[row, slot]
            if row.numel() == 0:
                continue
        else:
            row = torch.arange(xs.shape[0], device=x.device)
            scale = torch.ones(xs.shape[0], device=x.device)
        pre = xs[row] @ gate_up[e].float()
        out.index_add_(0, row, ((F.silu(pre[:, :D]) * pre[:, D:]) @ down[e].float()) * scale[:, None])
    return out


# --------------------------------------------------------------------------------------
# 1-3. large indices
# --------------------------------------------------------------------------------------


def check_large_index_layer(ctx: Context, dtype: torch.dtype, backward: bool) -> dict:
    T, H, D, E, k = (64, 48, 16, 16, 8) if ctx.smoke else (65_536, 7168, 64, 16, 8)
    result: dict = {"T": T, "H": H, "D": D, "E": E, "k": k, "dtype": dtype_name(dtype), "T_k_H": T * k * H,
                    "exceeds_2_31": T * k * H > 2**31}  # fmt: skip
    gen = ctx.generator(0)
    config = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=k)
    weights = moeflux.MoEWeights.random(config, device=ctx.device, dtype=dtype, generator=gen)
    x = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    with torch.no_grad():
        out, aux = moeflux.moe(x, weights, k, backend="triton")
    ids, w = aux.expert_ids, aux.expert_weights.detach()
    rows = sample_rows(T, ctx.device)
    exact = swiglu_rows_f32(x, ids, w, weights.gate_up, weights.down, E, rows)
    torch_rows = experts_torch(x[rows], ids[rows], w[rows], weights.gate_up, weights.down, E)
    result["finite"] = bool(torch.isfinite(out).all())
    result["rel_l2_triton_vs_fp32"] = rel_l2(out[rows], exact)
    result["rel_l2_torch_vs_fp32"] = rel_l2(torch_rows, exact)
    result["rel_l2_triton_vs_torch"] = rel_l2(out[rows], torch_rows)
    ok = result["finite"] and result["rel_l2_triton_vs_fp32"] < max(TOLERANCE[dtype], 1.5 * result["rel_l2_torch_vs_fp32"])
    del out, aux
    ctx.free()
    if backward:
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, weights.gate_up, weights.down)]
        grad_out = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
        experts_autograd(leaves[0], ids, *leaves[1:], E, check_ids=False).backward(grad_out)
        d_x, d_w, d_gate_up, d_down = (leaf.grad for leaf in leaves)
        del leaves
        ctx.free()
        # dx and d_w of a token depend on that token alone: float32 autograd on the sample.
        ref = [t.detach()[rows].float().requires_grad_() for t in (x, w)]
        ref_out = experts_torch(ref[0], ids[rows], ref[1], weights.gate_up.float(), weights.down.float(), E)
        ref_out.backward(grad_out[rows].float())
        result["rel_l2_dx_vs_fp32"] = rel_l2(d_x[rows], ref[0].grad)
        result["rel_l2_d_expert_weights_vs_fp32"] = rel_l2(d_w[rows], ref[1].grad)
        # The weight gradients: the same backward over token chunks (each far below 2**31).
        chunk = max(1, T // 8)
        sums = [torch.zeros_like(d_gate_up, dtype=torch.float32), torch.zeros_like(d_down, dtype=torch.float32)]
        for start in range(0, T, chunk):
            part = slice(start, start + chunk)
            leaves = [weights.gate_up.detach().clone().requires_grad_(), weights.down.detach().clone().requires_grad_()]
            experts_autograd(x[part], ids[part], w[part], *leaves, E, check_ids=False).backward(grad_out[part])
            sums[0] += leaves[0].grad.float()
            sums[1] += leaves[1].grad.float()
            del leaves
        result["rel_l2_d_gate_up_vs_chunked"] = rel_l2(d_gate_up, sums[0])
        result["rel_l2_d_down_vs_chunked"] = rel_l2(d_down, sums[1])
        grads_finite = all(bool(torch.isfinite(g).all()) for g in (d_x, d_w, d_gate_up, d_down))
        result["grads_finite"] = grads_finite
        bound = TOLERANCE[dtype]
        ok = ok and grads_finite and all(
            result[key] < bound for key in ("rel_l2_dx_vs_fp32", "rel_l2_d_expert_weights_vs_fp32",
                                            "rel_l2_d_gate_up_vs_chunked", "rel_l2_d_down_vs_chunked")
        )  # fmt: skip
    result["ok"] = bool(ok and (result["exceeds_2_31"] or ctx.smoke))
    return result


def check_large_index_weights(ctx: Context) -> dict:
    dtype = torch.bfloat16
    T, H, D, E, k = (48, 40, 24, 6, 3) if ctx.smoke else (2048, 7168, 4096, 64, 8)
    result: dict = {"T": T, "H": H, "D": D, "E": E, "k": k, "gate_up_elements": E * H * 2 * D,
                    "exceeds_2_31": E * H * 2 * D > 2**31}  # fmt: skip
    gen = ctx.generator(1)
    gate_up = torch.randn(E, H, 2 * D, device=ctx.device, dtype=dtype, generator=gen).mul_(D**-0.5)
    down = torch.randn(E, D, H, device=ctx.device, dtype=dtype, generator=gen).mul_(H**-0.5)
    x = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    ids = torch.rand(T, E, device=ctx.device, generator=gen).argsort(dim=1)[:, :k]
    ids[0, 0], ids[-1, 0] = 0, E - 1  # the first and the last expert have tokens (a repeat in a row is fine)
    w = torch.rand(T, k, device=ctx.device, generator=gen)
    grad_out = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    leaves = [t.requires_grad_() for t in (gate_up, down)]
    out = experts_autograd(x, ids, w, *leaves, E)
    out.backward(grad_out)
    rows = sample_rows(T, ctx.device)
    result["rel_l2_out_vs_fp32"] = rel_l2(out[rows], swiglu_rows_f32(x, ids, w, gate_up.detach(), down.detach(), E, rows))
    ok = result["rel_l2_out_vs_fp32"] < TOLERANCE[dtype]
    for e in (0, E - 1):  # expert E-1's gate_up starts past 2**31 elements
        token, slot = (ids == e).nonzero(as_tuple=True)
        g = gate_up.detach()[e].float().requires_grad_()
        d = down.detach()[e].float().requires_grad_()
        pre = x[token].float() @ g
        y = ((F.silu(pre[:, :D]) * pre[:, D:]) @ d) * w[token, slot, None]
        y.backward(grad_out[token].float())
        result[f"rel_l2_d_gate_up[{e}]"] = rel_l2(gate_up.grad[e], g.grad)
        result[f"rel_l2_d_down[{e}]"] = rel_l2(down.grad[e], d.grad)
        ok = ok and result[f"rel_l2_d_gate_up[{e}]"] < TOLERANCE[dtype] and result[f"rel_l2_d_down[{e}]"] < TOLERANCE[dtype]
    result["ok"] = bool(ok and (result["exceeds_2_31"] or ctx.smoke))
    return result


def flash_reference_on_picked_rows(hidden, down, up, indices, routing_weights, grad_out):
    """Float32 autograd of the flash expert over the picked pool rows only (compacted):
    ``(out, d_hidden, d_down[picked], d_up[picked], d_routing, picked)``."""
    picked, compact = torch.unique(indices, return_inverse=True)
    leaves = [t.detach().float().requires_grad_() for t in (hidden, down[picked], up[picked], routing_weights)]
    out = flash_expert_torch(leaves[0], leaves[1], leaves[2], compact, leaves[3])
    out.backward(grad_out.float())
    return (out.detach(), *(leaf.grad for leaf in leaves), picked)


def check_large_index_flash(ctx: Context) -> dict:
    dtype = torch.bfloat16
    T, H, E, K = (16, 64, 300, 4) if ctx.smoke else (4096, 2048, 1_200_000, 16)
    result: dict = {"T": T, "H": H, "E": E, "K": K, "pool_elements": E * H, "exceeds_2_31": E * H > 2**31}
    gen = ctx.generator(2)
    hidden = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    down = torch.randn(E, H, device=ctx.device, dtype=dtype, generator=gen).mul_(H**-0.5)
    up = torch.randn(E, H, device=ctx.device, dtype=dtype, generator=gen)
    indices = torch.randint(0, E, (T, K), device=ctx.device, generator=gen)
    indices[0, 0] = E - 1  # the last row of both pools
    routing_weights = torch.rand(T, K, device=ctx.device, generator=gen)
    grad_out = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    leaves = [t.requires_grad_() for t in (hidden, down, up, routing_weights)]
    out = flash_expert(leaves[0], leaves[1], leaves[2], indices, leaves[3], backend="triton", check_indices=False)
    out.backward(grad_out)
    exact = flash_reference_on_picked_rows(hidden, down, up, indices, routing_weights, grad_out)
    picked = exact[-1]
    result["picked_rows_past_2_31"] = int((picked.long() * H >= 2**31).sum())
    actual = (out, hidden.grad, down.grad[picked], up.grad[picked], routing_weights.grad)
    ok = True
    for name, a, e in zip(("out", "d_hidden", "d_down", "d_up", "d_routing_weights"), actual, exact[:5]):
        result[f"rel_l2_{name}_vs_fp32"] = rel_l2(a, e)
        ok = ok and result[f"rel_l2_{name}_vs_fp32"] < TOLERANCE[dtype]
    unpicked = torch.ones(E, dtype=torch.bool, device=ctx.device)
    unpicked[picked] = False
    nonzero_rows = [torch.count_nonzero(grad, dim=1) > 0 for grad in (down.grad, up.grad)]
    result["unpicked_grads_zero"] = not any(bool((rows & unpicked).any()) for rows in nonzero_rows)
    past = result["exceeds_2_31"] and result["picked_rows_past_2_31"] > 0
    result["ok"] = bool(ok and result["unpicked_grads_zero"] and (past or ctx.smoke))
    return result


# --------------------------------------------------------------------------------------
# 4-6. determinism, CUDA graphs, streams
# --------------------------------------------------------------------------------------


def make_layer(ctx: Context, dtype=torch.bfloat16):
    T, H, D, E, k, S = (40, 32, 16, 8, 3, 1) if ctx.smoke else (4096, 2048, 768, 128, 8, 1)
    torch.manual_seed(3)
    config = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=k, num_shared_experts=S)
    layer = moeflux.MoE(config, backend="triton", device=ctx.device, dtype=dtype)
    gen = ctx.generator(4)
    x = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    grad_out = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    return layer, x, grad_out


def layer_step(layer, x, grad_out):
    """``(out, dx, d_router, d_gate_up, d_down)`` of one forward and backward (``autograd.grad``)."""
    leaf = x.detach().requires_grad_()
    out, aux = layer(leaf)
    params = (layer.router, layer.gate_up, layer.down)
    grads = torch.autograd.grad(out, (leaf, *params), grad_out)
    return (out.detach(), *grads)


def flash_problem(ctx: Context, dtype=torch.bfloat16):
    T, H, E, K = (24, 48, 100, 4) if ctx.smoke else (8192, 1024, 65_536, 16)
    gen = ctx.generator(5)
    hidden = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    down = torch.randn(E, H, device=ctx.device, dtype=dtype, generator=gen).mul_(H**-0.5)
    up = torch.randn(E, H, device=ctx.device, dtype=dtype, generator=gen)
    indices = torch.randint(0, E, (T, K), device=ctx.device, generator=gen)
    routing_weights = torch.rand(T, K, device=ctx.device, generator=gen)
    grad_out = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    return hidden, down, up, indices, routing_weights, grad_out


def flash_step(hidden, down, up, indices, routing_weights, grad_out, deterministic=True):
    leaves = [t.detach().requires_grad_() for t in (hidden, down, up, routing_weights)]
    out = flash_expert(leaves[0], leaves[1], leaves[2], indices, leaves[3], backend="triton",
                       deterministic=deterministic, check_indices=False)  # fmt: skip
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(), *grads)


def bitwise(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second))


def check_determinism_layer(ctx: Context) -> dict:
    layer, x, grad_out = make_layer(ctx)
    first, second = layer_step(layer, x, grad_out), layer_step(layer, x, grad_out)
    names = ("out", "dx", "d_router", "d_gate_up", "d_down")
    result = {"T": x.shape[0], "bitwise": {n: torch.equal(a, b) for n, a, b in zip(names, first, second)}}
    result["finite"] = all(bool(torch.isfinite(t).all()) for t in first)
    result["ok"] = all(result["bitwise"].values()) and result["finite"]
    return result


def check_determinism_flash(ctx: Context) -> dict:
    problem = flash_problem(ctx)
    names = ("out", "d_hidden", "d_down", "d_up", "d_routing_weights")
    first, second = flash_step(*problem), flash_step(*problem)
    result = {"bitwise": {n: torch.equal(a, b) for n, a, b in zip(names, first, second)}}
    atomic = flash_step(*problem, deterministic=False), flash_step(*problem, deterministic=False)
    result["atomic_path_bitwise_run_to_run (informational)"] = bitwise(*atomic)
    result["ok"] = all(result["bitwise"].values())
    return result


def check_graph_layer_forward(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"ok": None, "skipped": "needs CUDA"}
    layer, x, _ = make_layer(ctx)
    static_x = x.clone()

    def forward():
        with torch.no_grad():
            return layer(static_x)[0]

    graph, static_out = capture(forward)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    ctx.sync()
    eager = forward()
    return {"ok": torch.equal(static_out, eager), "replayed_equals_eager_on_new_input": torch.equal(static_out, eager)}


def check_graph_layer_backward(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"ok": None, "skipped": "needs CUDA"}
    layer, x, grad_out = make_layer(ctx)
    static_x, static_grad = x.clone(), grad_out.clone()
    graph, static = capture(lambda: layer_step(layer, static_x, static_grad))
    new_x, new_grad = torch.randn_like(x), torch.randn_like(grad_out)
    static_x.copy_(new_x)
    static_grad.copy_(new_grad)
    graph.replay()
    ctx.sync()
    eager = layer_step(layer, new_x, new_grad)
    names = ("out", "dx", "d_router", "d_gate_up", "d_down")
    result = {"bitwise": {n: torch.equal(a, b) for n, a, b in zip(names, static, eager)}}
    result["ok"] = all(result["bitwise"].values())
    return result


def check_graph_flash(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"ok": None, "skipped": "needs CUDA"}
    hidden, down, up, indices, routing_weights, grad_out = flash_problem(ctx)
    static = [t.clone() for t in (hidden, indices, grad_out)]
    graph, outputs = capture(lambda: flash_step(static[0], down, up, static[1], routing_weights, static[2]))
    new_hidden, new_indices = torch.randn_like(hidden), torch.randint_like(indices, 0, down.shape[0])
    new_grad = torch.randn_like(grad_out)
    for buffer, value in zip(static, (new_hidden, new_indices, new_grad)):
        buffer.copy_(value)
    graph.replay()
    ctx.sync()
    eager = flash_step(new_hidden, down, up, new_indices, routing_weights, new_grad)
    names = ("out", "d_hidden", "d_down", "d_up", "d_routing_weights")
    result = {"bitwise": {n: torch.equal(a, b) for n, a, b in zip(names, outputs, eager)}}
    result["ok"] = all(result["bitwise"].values())
    return result


def check_stream(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"ok": None, "skipped": "needs CUDA"}
    layer, x, grad_out = make_layer(ctx)
    problem = flash_problem(ctx)
    default = layer_step(layer, x, grad_out), flash_step(*problem)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = layer_step(layer, x, grad_out), flash_step(*problem)
    torch.cuda.current_stream().wait_stream(side)
    ctx.sync()
    result = {"layer_bitwise": bitwise(default[0], on_side[0]), "flash_bitwise": bitwise(default[1], on_side[1])}
    result["ok"] = result["layer_bitwise"] and result["flash_bitwise"]
    return result


# --------------------------------------------------------------------------------------
# 7. memory
# --------------------------------------------------------------------------------------


def check_memory_limit(ctx: Context) -> dict:
    """10M tokens at the competition's shape, inputs expanded from one row (no memory)."""
    T, H, D, E, k, S = (10_000_000, 7168, 2048, 32, 4, 1)
    dtype = torch.float16
    if ctx.smoke:
        H, D = 64, 32
    config = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=k, num_shared_experts=S)
    weights = moeflux.MoEWeights.random(config, device=ctx.device, dtype=dtype)
    x = torch.randn(1, H, device=ctx.device, dtype=dtype).expand(T, H)
    ids = torch.arange(k, device=ctx.device)[None, :].expand(T, k)
    w = torch.ones(1, 1, device=ctx.device).expand(T, k)
    required = memory.experts_forward_bytes(T, H, D, k, E, S, dtype).peak
    result: dict = {"T": T, "required_bytes": required}
    simulated = None if ctx.cuda else mock.patch.object(memory, "available_bytes", lambda device, at_least=0: 2**30)
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    try:
        if simulated:
            simulated.start()
        experts_triton(x, ids, w, weights.gate_up, weights.down, E, check_ids=False)
        result["raised"] = False
    except torch.OutOfMemoryError as error:
        result["raised"] = True
        result["message"] = str(error)
    finally:
        if simulated:
            simulated.stop()
            result["simulated_free_bytes"] = 2**30
    result["names_required_bytes"] = f"needs {required:,} bytes" in result.get("message", "")
    if ctx.cuda:  # the weights' address tables (a few hundred bytes) at most
        result["allocated_during_call"] = torch.cuda.max_memory_allocated() - before
    small = result.get("allocated_during_call", 0) < 2**20
    result["ok"] = bool(result["raised"] and result["names_required_bytes"] and small)
    # The free-memory query's cost per call: cudaMemGetInfo alone, and with the allocator's stats.
    if ctx.cuda:
        for name, at_least in (("available_bytes_us", 0), ("available_bytes_with_allocator_stats_us", 2**62)):
            start = time.perf_counter()
            for _ in range(200):
                memory.available_bytes(ctx.device, at_least=at_least)
            result[name] = 1e6 * (time.perf_counter() - start) / 200
    return result


def measured_bytes(ctx: Context, fn):
    """``(peak bytes allocated by fn beyond what was allocated before, fn())`` on CUDA."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


def check_memory_estimates(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"ok": None, "skipped": "needs CUDA (tests/test_memory.py checks the estimates on the CPU)"}
    # The layer shape of the determinism checks (kernels compiled already), and their flash problem.
    T, H, D, E, k, S, dtype = 4096, 2048, 768, 128, 8, 1, torch.bfloat16
    gen = ctx.generator(6)
    config = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=k, num_shared_experts=S)
    weights = moeflux.MoEWeights.random(config, device=ctx.device, dtype=dtype, generator=gen)
    x = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    ids = torch.rand(T, E, device=ctx.device, generator=gen).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, device=ctx.device, generator=gen)
    slack = 2**20  # the caching allocator rounds each block up (512 bytes; 2 MiB for large ones)
    rows = {}
    args = (x, ids, w, weights.gate_up, weights.down, E)
    experts_triton(*args, check_ids=False)  # compile first
    peak, _ = measured_bytes(ctx, lambda: experts_triton(*args, check_ids=False))
    rows["experts inference forward"] = (peak, memory.experts_forward_bytes(T, H, D, k, E, S, dtype).peak)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, weights.gate_up, weights.down)]
    experts_autograd(leaves[0], ids, *leaves[1:], E, check_ids=False).float().sum().backward()
    for leaf in leaves:
        leaf.grad = None
    peak, out = measured_bytes(ctx, lambda: experts_autograd(leaves[0], ids, *leaves[1:], E, check_ids=False))
    rows["experts training forward"] = (peak, memory.experts_forward_bytes(T, H, D, k, E, S, dtype, training=True).peak)
    grad_out = torch.randn_like(out)
    peak, _ = measured_bytes(ctx, lambda: out.backward(grad_out))
    rows["experts backward"] = (peak, memory.experts_backward_bytes(T, H, D, k, E, S, dtype).peak)
    del out, leaves
    hidden, down, up, indices, routing_weights, grad_out = flash_problem(ctx)
    Tf, Hf, Ef, K = hidden.shape[0], hidden.shape[1], down.shape[0], indices.shape[1]
    leaves = [t.detach().requires_grad_() for t in (hidden, down, up, routing_weights)]
    flash_step(hidden, down, up, indices, routing_weights, grad_out)  # compile first
    peak, out = measured_bytes(ctx, lambda: flash_expert(leaves[0], leaves[1], leaves[2], indices, leaves[3],
                                                          backend="triton", check_indices=False))  # fmt: skip
    rows["flash forward"] = (peak, memory.flash_expert_forward_bytes(Tf, Hf, Ef, K, hidden.dtype).peak)
    peak, _ = measured_bytes(ctx, lambda: out.backward(grad_out))
    rows["flash backward"] = (peak, memory.flash_expert_backward_bytes(Tf, Hf, Ef, K, hidden.dtype).peak)
    result = {
        name: {"measured_bytes": m, "estimate_bytes": e, "measured_over_estimate": m / e if e else None}
        for name, (m, e) in rows.items()
    }
    result["ok"] = all(m <= e + slack for m, e in rows.values())
    return result


# --------------------------------------------------------------------------------------
# 8-10. deterministic algorithms, odd shapes, empty experts
# --------------------------------------------------------------------------------------


class DeterministicAlgorithms:
    """``torch.use_deterministic_algorithms(True)`` within the block, restored after."""

    def __enter__(self):
        self.before = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before, warn_only=self.warn_only)


def check_deterministic_algorithms(ctx: Context) -> dict:
    result: dict = {}
    layer, x, grad_out = make_layer(ctx)
    plain = layer_step(layer, x, grad_out)
    with DeterministicAlgorithms():
        under = layer_step(layer, x, grad_out)
    result["layer_triton_bitwise_as_without"] = bitwise(plain, under)
    result["layer_triton_finite"] = all(bool(torch.isfinite(t).all()) for t in under)
    layer.backend = "torch"
    try:
        with DeterministicAlgorithms():
            torch_results = layer_step(layer, x, grad_out)
        result["layer_torch_runs"] = True
        result["layer_torch_finite"] = all(bool(torch.isfinite(t).all()) for t in torch_results)
    except RuntimeError as error:  # an op without a deterministic implementation
        result["layer_torch_runs"] = False
        result["layer_torch_error"] = str(error)[:400]
    problem = flash_problem(ctx)
    reference = flash_step(*problem)
    with DeterministicAlgorithms(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = flash_step(*problem, deterministic=False)
    result["flash_warned"] = any("torch.use_deterministic_algorithms(True) is set" in str(w.message) for w in caught)
    result["flash_fallback_bitwise_as_deterministic"] = bitwise(reference, fallback)
    result["ok"] = bool(
        result["layer_triton_bitwise_as_without"] and result["layer_triton_finite"] and result["layer_torch_runs"]
        and result.get("layer_torch_finite", False) and result["flash_warned"]
        and result["flash_fallback_bitwise_as_deterministic"]
    )  # fmt: skip
    return result


def check_odd_shapes(ctx: Context) -> dict:
    dtype = torch.bfloat16
    T, H, D, E, k, S = (37, 33, 17, 5, 2, 1) if ctx.smoke else (777, 1023, 257, 9, 3, 1)
    gen = ctx.generator(7)
    # x is a view one element (2 bytes) past a 16-byte boundary, with row stride H + 1.
    buffer = torch.randn(T, H + 1, device=ctx.device, dtype=dtype, generator=gen)
    gate_up = torch.randn(E + S, H, 2 * D, device=ctx.device, dtype=dtype, generator=gen).mul_(D**-0.5)
    down = torch.randn(E + S, D, H, device=ctx.device, dtype=dtype, generator=gen).mul_(H**-0.5)
    ids = torch.rand(T, E, device=ctx.device, generator=gen).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, device=ctx.device, generator=gen)
    grad_out = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    names = ("out", "dx", "d_expert_weights", "d_gate_up", "d_down")

    def run(fn, cast=False):
        convert = (lambda t: t.float()) if cast else (lambda t: t)
        leaves = [convert(t).detach().clone().requires_grad_() for t in (buffer, gate_up, down)]
        w_leaf = w.detach().clone().requires_grad_()
        x = leaves[0][:, 1:]
        out = fn(x, ids, w_leaf, leaves[1], leaves[2], E)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), leaves[0].grad[:, 1:], w_leaf.grad, leaves[1].grad, leaves[2].grad

    triton_results = run(lambda *a: experts_autograd(*a, check_ids=False))
    torch_results = run(experts_torch)
    exact = run(experts_torch, cast=True)
    result = {"T": T, "H": H, "D": D, "x_data_ptr_mod_16": buffer[:, 1:].data_ptr() % 16}
    ok = True
    for name, a, own, e in zip(names, triton_results, torch_results, exact):
        result[f"rel_l2_{name}_triton"] = rel_l2(a, e)
        result[f"rel_l2_{name}_torch"] = rel_l2(own, e)
        ok = ok and result[f"rel_l2_{name}_triton"] < max(TOLERANCE[dtype], 1.5 * result[f"rel_l2_{name}_torch"])
    result["ok"] = bool(ok)
    return result


def check_empty_experts(ctx: Context) -> dict:
    dtype = torch.bfloat16
    T, H, D, E, k, used = (40, 32, 16, 12, 2, 4) if ctx.smoke else (4096, 2048, 768, 128, 8, 32)
    gen = ctx.generator(8)
    x = torch.randn(T, H, device=ctx.device, dtype=dtype, generator=gen)
    gate_up = torch.randn(E, H, 2 * D, device=ctx.device, dtype=dtype, generator=gen).mul_(D**-0.5)
    down = torch.randn(E, D, H, device=ctx.device, dtype=dtype, generator=gen).mul_(H**-0.5)
    ids = torch.rand(T, used, device=ctx.device, generator=gen).argsort(dim=1)[:, :k]  # experts 0 .. used-1
    w = torch.rand(T, k, device=ctx.device, generator=gen)
    leaves = [t.requires_grad_() for t in (x, w, gate_up, down)]
    start = time.perf_counter()
    with DeterministicAlgorithms():  # torch.empty now fills with NaN: unwritten rows would show
        out = experts_autograd(leaves[0], ids, *leaves[1:], E)
        out.backward(torch.randn_like(out))
    ctx.sync()
    result = {"E": E, "experts_with_tokens": used, "seconds": time.perf_counter() - start}
    result["finite"] = all(bool(torch.isfinite(t).all()) for t in (out, *(leaf.grad for leaf in leaves)))
    result["unused_weight_grads_zero"] = bool((gate_up.grad[used:] == 0).all() and (down.grad[used:] == 0).all())
    result["ok"] = result["finite"] and result["unused_weight_grads_zero"]
    return result


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


CHECKS = [
    ("large-index-layer-bf16", lambda ctx: check_large_index_layer(ctx, torch.bfloat16, backward=True)),
    ("large-index-layer-fp16", lambda ctx: check_large_index_layer(ctx, torch.float16, backward=False)),
    ("large-index-weights", check_large_index_weights),
    ("large-index-flash", check_large_index_flash),
    ("determinism-layer", check_determinism_layer),
    ("determinism-flash", check_determinism_flash),
    ("cuda-graph-layer-forward", check_graph_layer_forward),
    ("cuda-graph-layer-backward", check_graph_layer_backward),
    ("cuda-graph-flash", check_graph_flash),
    ("stream", check_stream),
    ("memory-limit-message", check_memory_limit),
    ("memory-estimates", check_memory_estimates),
    ("deterministic-algorithms", check_deterministic_algorithms),
    ("odd-shapes", check_odd_shapes),
    ("empty-experts", check_empty_experts),
]


def run_checks(ctx: Context, only: str | None) -> list[dict]:
    results = []
    for name, fn in CHECKS:
        if only and only not in name:
            continue
        start = time.perf_counter()
        try:
            result = fn(ctx)
        except Exception as error:  # a crash is a failed check, reported with its traceback
            result = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:500]}",
                      "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        result = {"name": name, **result, "seconds": round(time.perf_counter() - start, 2)}
        ctx.free()
        status = {True: "ok  ", False: "FAIL", None: "skip"}[result["ok"]]
        figures = {k: v for k, v in result.items() if k not in ("name", "ok", "traceback", "message")}
        print(f"[{status}] {name}: {figures}")
        sys.stdout.flush()
        results.append(result)
    return results


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| check | result | seconds | figures |", "|---|---|---|---|"]
    for r in results:
        status = {True: "pass", False: "**FAIL**", None: "skipped"}[r["ok"]]
        figures = "; ".join(
            f"{k}={v:.2e}" if isinstance(v, float) and k != "seconds" else f"{k}={v}"
            for k, v in r.items() if k not in ("name", "ok", "seconds", "traceback", "message")
        )  # fmt: skip
        lines.append(f"| {r['name']} | {status} | {r['seconds']} | {figures.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder (or .json path) for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself (CPU too)")
    parser.add_argument("--only", default=None, help="run only the checks whose name contains this text")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    picked = pick_device(args.smoke)
    if picked is None:
        return 2
    device, gpu = picked
    print(f"# moeflux reliability checks on {gpu}; torch {torch.__version__}, triton {triton.__version__}\n")
    results = run_checks(Context(device, args.smoke), args.only)
    ok = all(r["ok"] is not False for r in results)
    wall = time.perf_counter() - started
    summary = (
        f"moeflux reliability checks on {gpu} ({'smoke, ' if args.smoke else ''}{wall:.0f} s): "
        f"{sum(r['ok'] is True for r in results)} passed, {sum(r['ok'] is False for r in results)} failed, "
        f"{sum(r['ok'] is None for r in results)} skipped"
    )
    report = {
        **run_info(gpu),
        "smoke": args.smoke,
        "checks_ok": ok,
        "checks": results,
        "wall_s": wall,
    }
    json_path = report_path(args.out, "reliability_gpu.json")
    write_report(json_path, report, markdown(results, summary))
    print(f"\n{summary}\nwrote {json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
