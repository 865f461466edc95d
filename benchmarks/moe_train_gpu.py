"""GPU check and timing of the Triton experts autograd (``moeflux.ops.experts.autograd``):
forward + backward against a plain ``torch._grouped_mm`` autograd MoE.

    PYTHONPATH=src python3 benchmarks/moe_train_gpu.py --out $OUT

1. Checks (bfloat16): every gradient (``x``, ``expert_weights``, ``gate_up``, ``down``) and the
   output of ``experts_autograd`` and of the torch path (``experts_torch``) against the torch
   path's autograd on float32 copies (no TF32), at the competition's test shapes (H=7168,
   D=2048, E=4/8, S=1, k=4, T=512/1024/8192) and Qwen3-30B-A3B (T=4096). Target: Triton's
   rel-L2 no worse than 1.5x the torch path's (``RATIO_TARGET``). Also: finite, bitwise
   reproducible, no host sync (``set_sync_debug_mode("error")``) in forward + backward.
2. Timing (bfloat16, medians of ``triton.testing.do_bench``), one training step = forward +
   ``torch.autograd.grad`` of the four inputs: ``experts_autograd`` against
   ``grouped_mm_moe`` below, at the competition's benchmark shapes (E=32, k=4, S=1,
   T=2048/8192/8192) and the model prefill shapes (Qwen3, Mixtral, DeepSeek-V3 slice).
   FLOPs = 3x the forward's ``2 T H 3D (k + S)``; % of a dense peak measured in this run (torch
   8192^3 bfloat16 matmul). Memory: saved activations (allocated after the forward, less the
   output) and the step's peak (``max_memory_allocated`` minus the memory before it), also
   less the returned gradients (both implementations allocate the weight gradients before
   their peak, so this approximates the activation peak). Out of memory is recorded per shape.
   The same for ``experts_autograd(..., recompute=True)`` (no pre-activations saved).
3. Parts of the Triton step (plan, each GEMM, the weight-gradient launches, elementwise, combine),
   the transposed-weight GEMMs read in place vs from a contiguous transposed copy, and a sweep
   of weight-gradient configs (T=8192, Qwen3, T=2048; the former main loop among them, each output
   compared with the default's) while the time budget lasts, with the config to commit per
   row-loop regime ("weight-gradient choice").
4. A Markdown table on stdout, JSON and the tables under ``--out``. Exit 1 if a check fails.

``--smoke`` runs tiny shapes (also on the CPU with TRITON_INTERPRET=1) to check the script; there its
ratio checks fail by design: Triton 3.6's interpreter truncates float32 -> bfloat16 (the GPU rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

from _common import no_host_sync, pick_device, rel_l2, report_path, run_info, time_ms, write_report
import torch
import torch.nn.functional as F
import triton

from moeflux.config import MoEConfig
from moeflux.ops.dispatch import build_dispatch_plan
from moeflux.ops.experts.autograd import _down_weight_grad, _swiglu, _swiglu_backward, experts_autograd
from moeflux.ops.experts.naive import experts_torch
from moeflux.ops.experts.triton import combine_pairs
from moeflux.ops.grouped_matmul import grouped_matmul
from moeflux.ops.grouped_matmul.weight_grad import (
    WIDE_TILE_MIN_ROWS,
    WeightGradConfig,
    grouped_weight_grad,
    select_weight_grad_config,
)
from moeflux.ops.routing import route
from moeflux.weights import MoEWeights

RATIO_TARGET = 1.5  # Triton's rel-L2 against float32 at most this times the torch path's
BUDGET_S = 200.0  # no new weight-gradient sweep after this many seconds of the run
NAMES = ("out", "x", "expert_weights", "gate_up", "down")

# The router's ids are valid by construction: skip the id check (a host sync).
triton_experts = functools.partial(experts_autograd, check_ids=False)
recompute_experts = functools.partial(experts_autograd, check_ids=False, recompute=True)


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    H: int
    D: int
    E: int
    S: int
    k: int
    seed: int

    @property
    def top_k(self) -> int:
        return self.k + self.S

    @property
    def step_flops(self) -> int:
        """Forward + backward: 3x the forward's ``2 T H 3D k'``."""
        return 3 * 2 * self.T * self.H * 3 * self.D * self.top_k


def load_shapes(smoke: bool) -> tuple[list[Shape], list[Shape]]:
    """``(check shapes, timing shapes)``."""
    if smoke:
        checks = [Shape("smoke-shared", 24, 32, 16, 4, 1, 2, 1), Shape("smoke-many", 16, 32, 16, 8, 0, 2, 2)]
        return checks, [Shape("smoke-time", 32, 32, 16, 4, 1, 2, 3)]
    data = importlib.resources.files("moeflux") / "data"
    competition = json.loads((data / "competition.json").read_text())
    models = json.loads((data / "models.json").read_text())["shapes"]

    def shape(name, case):
        return Shape(name, case["bs"] * case["seqlen"], case["dhidden"], case["dexpert"], case["nroutedexperts"],
                     case["nsharedexperts"], case["nexpertspertoken"], case["seed"])  # fmt: skip

    checks = [shape(f"competition-test-{i} (E={c['nroutedexperts']}, T={c['bs'] * c['seqlen']})", c)
              for i, c in enumerate(competition["tests"])]  # fmt: skip
    timing = [shape(f"competition-{i} (bs={c['bs']}, seq={c['seqlen']})", c)
              for i, c in enumerate(competition["benchmarks"])]  # fmt: skip
    prefill = [shape(c["name"], c) for c in models if c["name"].endswith("prefill")]
    checks += [s for s in prefill if s.name.startswith("qwen3")]
    return checks, timing + prefill


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def dense_peak_tflops(device: torch.device, smoke: bool) -> float:
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / (time_ms(lambda: a @ b) * 1e-3) / 1e12


# --------------------------------------------------------------------------------------
# the baseline and the inputs
# --------------------------------------------------------------------------------------


def grouped_mm_moe(x, expert_ids, expert_weights, gate_up, down, num_routed):
    """The MoE written plainly on ``torch._grouped_mm`` (weights stacked once: the packed
    layout), differentiated by autograd: shared slices as extra experts of weight 1, sort the
    pairs by expert, gate|up grouped GEMM, SwiGLU, down grouped GEMM, weight, unsort, sum."""
    T, H = x.shape
    num_shared = gate_up.shape[0] - num_routed
    shared = torch.arange(num_routed, num_routed + num_shared, device=x.device).expand(T, num_shared)
    ids = torch.cat([expert_ids, shared], dim=1).reshape(-1)  # [P]
    weights = torch.cat([expert_weights, expert_weights.new_ones(T, num_shared)], dim=1).reshape(-1)
    top_k = ids.shape[0] // max(T, 1)
    order = torch.argsort(ids, stable=True)
    offsets = torch.bincount(ids, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x[order // top_k], gate_up, offs=offsets).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down, offs=offsets) * weights[order, None].to(x.dtype)
    pair_out = torch.empty_like(y).index_copy(0, order, y)
    return pair_out.view(T, top_k, H).sum(dim=1)


def make_inputs(shape: Shape, device: torch.device):
    """``(x, expert_ids, expert_weights, gate_up, down, E)`` in bfloat16 (weights float32),
    router-chosen experts (softmax top-k), and a ``grad_out``."""
    generator = torch.Generator(device=device).manual_seed(shape.seed)
    config = MoEConfig(shape.H, shape.D, shape.E, shape.k, num_shared_experts=shape.S)
    weights = MoEWeights.random(config, device=device, dtype=torch.bfloat16, generator=generator)
    x = torch.randn(shape.T, shape.H, device=device, dtype=torch.bfloat16, generator=generator)
    routing = route(F.linear(x, weights.router), shape.k, backend="torch")
    grad_out = torch.randn(shape.T, shape.H, device=device, dtype=torch.bfloat16, generator=generator)
    inputs = (x, routing.expert_ids, routing.expert_weights.detach().float(), weights.gate_up, weights.down, shape.E)
    return inputs, grad_out


def leaves_of(inputs, dtype=None):
    """Fresh leaf copies (``dtype`` for the activations and weights) that require grad."""
    x, expert_ids, expert_weights, gate_up, down, num_routed = inputs
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = [cast(x).detach().clone(), expert_weights.detach().clone(), cast(gate_up).detach().clone(),
              cast(down).detach().clone()]  # fmt: skip
    return [leaf.requires_grad_() for leaf in leaves], expert_ids, num_routed


def step(experts, leaves, expert_ids, num_routed, grad_out):
    """One forward + backward: ``(out, (dx, d_expert_weights, d_gate_up, d_down))``."""
    x, expert_weights, gate_up, down = leaves
    out = experts(x, expert_ids, expert_weights, gate_up, down, num_routed)
    return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


# --------------------------------------------------------------------------------------
# 1. checks
# --------------------------------------------------------------------------------------


def check_shape(shape: Shape, device: torch.device) -> dict:
    result: dict = {"shape": shape.name, "T": shape.T, "H": shape.H, "D": shape.D, "E": shape.E, "S": shape.S,
                    "k": shape.k}  # fmt: skip
    try:
        inputs, grad_out = make_inputs(shape, device)
        leaves, expert_ids, E = leaves_of(inputs, torch.float32)
        exact = step(experts_torch, leaves, expert_ids, E, grad_out)
        exact = [exact[0].detach(), *exact[1]]
        del leaves
        free_memory()
        results = {}
        for name, experts in (("triton", triton_experts), ("recompute", recompute_experts), ("torch", experts_torch),
                              ("grouped_mm", grouped_mm_moe)):  # fmt: skip
            leaves, expert_ids, E = leaves_of(inputs)
            try:
                out, grads = step(experts, leaves, expert_ids, E, grad_out)
                results[name] = [out.detach(), *grads]
            except Exception as error:
                result[f"{name}_error"] = error_text(error)
            del leaves
        triton_run = results.get("triton")
        for name, values in results.items():
            result[f"rel_l2_{name}_vs_fp32"] = {n: rel_l2(v, e) for n, v, e in zip(NAMES, values, exact)}
        if triton_run is not None and "torch" in results:
            ratios = {n: result["rel_l2_triton_vs_fp32"][n] / max(result["rel_l2_torch_vs_fp32"][n], 1e-30)
                      for n in NAMES}  # fmt: skip
            result["ratio_triton_to_torch"] = ratios
            result["worst_ratio"] = max(ratios.values())
        if "recompute" in results and "torch" in results:
            result["recompute_worst_ratio"] = max(
                result["rel_l2_recompute_vs_fp32"][n] / max(result["rel_l2_torch_vs_fp32"][n], 1e-30) for n in NAMES
            )
        if triton_run is not None:
            result["finite"] = all(bool(torch.isfinite(v).all()) for v in triton_run)
            leaves, expert_ids, E = leaves_of(inputs)
            again = step(triton_experts, leaves, expert_ids, E, grad_out)
            result["bitwise_reproducible"] = all(torch.equal(a, b) for a, b in zip(triton_run, [again[0], *again[1]]))
            del again
            result["no_host_sync"] = no_host_sync(lambda: step(triton_experts, leaves, expert_ids, E, grad_out))
            unused = [e for e in range(E) if not bool((expert_ids == e).any())]
            result["empty_experts"] = unused
            result["empty_expert_grads_zero"] = all(
                bool((g[unused] == 0).all()) for g in triton_run[3:]
            ) if unused else None  # fmt: skip
        del results, exact, inputs
    except torch.cuda.OutOfMemoryError as error:
        result["error"] = "OOM: " + error_text(error)
    except Exception as error:
        result["error"] = error_text(error)
    free_memory()
    result["ok"] = bool(
        "error" not in result and "triton_error" not in result and result.get("finite")
        and result.get("worst_ratio", math.inf) <= RATIO_TARGET and result.get("bitwise_reproducible")
        and "recompute_error" not in result and result.get("recompute_worst_ratio", math.inf) <= RATIO_TARGET
        and result.get("no_host_sync") is not False and result.get("empty_expert_grads_zero") is not False
    )  # fmt: skip
    return result


# --------------------------------------------------------------------------------------
# 2. timing and memory
# --------------------------------------------------------------------------------------


def measure_memory(experts, leaves, expert_ids, num_routed, grad_out) -> dict:
    """Bytes of one step beyond what was allocated before it (see the module docstring)."""
    if not torch.cuda.is_available():
        return {}
    free_memory()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    x, expert_weights, gate_up, down = leaves
    out = experts(x, expert_ids, expert_weights, gate_up, down, num_routed)
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    grads = torch.autograd.grad(out, leaves, grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    del out, grads
    free_memory()
    mib = 2**20
    return {"saved_mib": saved / mib, "saved_bytes_per_token": saved / x.shape[0], "peak_mib": peak / mib,
            "peak_less_grads_mib": (peak - grad_bytes) / mib}  # fmt: skip


def time_shape(shape: Shape, device: torch.device, peak: float) -> dict:
    row: dict = {"shape": shape.name, "T": shape.T, "H": shape.H, "D": shape.D, "E": shape.E, "S": shape.S,
                 "k": shape.k, "step_flops": shape.step_flops}  # fmt: skip
    try:
        inputs, grad_out = make_inputs(shape, device)
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = "OOM (inputs): " + error_text(error)
        return row
    for name, experts in (("triton", triton_experts), ("recompute", recompute_experts), ("grouped_mm", grouped_mm_moe)):
        try:
            leaves, expert_ids, E = leaves_of(inputs)
            row[f"{name}_ms"] = time_ms(lambda: step(experts, leaves, expert_ids, E, grad_out))
            row[f"{name}_forward_ms"] = time_ms(
                lambda: experts(leaves[0].detach(), expert_ids, leaves[1].detach(), leaves[2].detach(),
                                leaves[3].detach(), E), quick=True,
            )  # fmt: skip
            row[f"{name}_tflops"] = shape.step_flops / (row[f"{name}_ms"] * 1e-3) / 1e12
            row[f"{name}_pct_peak"] = 100 * row[f"{name}_tflops"] / peak
            for key, value in measure_memory(experts, leaves, expert_ids, E, grad_out).items():
                row[f"{name}_{key}"] = value
            del leaves
        except torch.cuda.OutOfMemoryError as error:
            row[f"{name}_error"] = "OOM: " + error_text(error)
        except Exception as error:
            row[f"{name}_error"] = error_text(error)
        free_memory()
    mine, theirs = row.get("triton_ms"), row.get("grouped_mm_ms")
    row["speedup"] = theirs / mine if mine and theirs else None
    mine, theirs = row.get("triton_peak_less_grads_mib"), row.get("grouped_mm_peak_less_grads_mib")
    row["activation_memory_ratio"] = mine / theirs if mine and theirs else None
    mine, theirs = row.get("recompute_ms"), row.get("grouped_mm_ms")
    row["recompute_speedup"] = theirs / mine if mine and theirs else None
    mine, theirs = row.get("recompute_peak_less_grads_mib"), row.get("grouped_mm_peak_less_grads_mib")
    row["recompute_activation_memory_ratio"] = mine / theirs if mine and theirs else None
    try:
        row["parts"] = time_parts(shape, inputs, grad_out)
    except torch.cuda.OutOfMemoryError as error:
        row["parts_error"] = "OOM: " + error_text(error)
    except Exception as error:
        row["parts_error"] = error_text(error)
    del inputs, grad_out
    free_memory()
    return row


def time_parts(shape: Shape, inputs, grad_out) -> dict:
    """Each launch of the Triton step alone (default configs), ms and TFLOP/s of the GEMMs."""
    x, expert_ids, expert_weights, gate_up, down, E = inputs
    T, H, D, S, top_k = shape.T, shape.H, shape.D, shape.S, shape.top_k
    P = T * top_k
    plan = build_dispatch_plan(expert_ids, E, num_shared_experts=S, check_ids=False)
    pair_weights = torch.cat([expert_weights, torch.ones(T, S, device=x.device)], dim=1).reshape(-1)
    pre = grouped_matmul(x, gate_up, plan, gather=True)
    hidden = _swiglu(pre)
    pair_out = grouped_matmul(hidden, down, plan, row_scale=pair_weights, scatter=True)
    g = grouped_matmul(grad_out, down.transpose(1, 2), plan, gather=True)
    d_pre, _ = _swiglu_backward(pre, g, pair_weights, plan)
    gemm_flops = {"gate_up": 2 * P * H * 2 * D, "down": 2 * P * D * H}
    parts = {
        "plan": (lambda: build_dispatch_plan(expert_ids, E, num_shared_experts=S, check_ids=False), None),
        "fwd gate_up GEMM": (lambda: grouped_matmul(x, gate_up, plan, gather=True), gemm_flops["gate_up"]),
        "fwd swiglu": (lambda: _swiglu(pre), None),
        "fwd down GEMM": (lambda: grouped_matmul(hidden, down, plan, row_scale=pair_weights, scatter=True),
                          gemm_flops["down"]),
        "fwd combine": (lambda: combine_pairs(pair_out.view(T, top_k, H)), None),
        "bwd dh GEMM (W_down^T view)": (lambda: grouped_matmul(grad_out, down.transpose(1, 2), plan, gather=True),
                                        gemm_flops["down"]),
        "bwd swiglu": (lambda: _swiglu_backward(pre, g, pair_weights, plan), None),
        # g holds w h after the backward's SwiGLU step, dW_down's operand.
        "bwd dW_down": (lambda: _down_weight_grad(g, grad_out, plan, None, torch.empty_like(down)), gemm_flops["down"]),
        "bwd dW_gate_up": (lambda: grouped_weight_grad(x, d_pre, plan, a_rows="tokens"), gemm_flops["gate_up"]),
        "bwd dx GEMM (W_gate_up^T view)": (lambda: grouped_matmul(d_pre, gate_up.transpose(1, 2), plan, scatter=True),
                                           gemm_flops["gate_up"]),
        "bwd combine": (lambda: combine_pairs(pair_out.view(T, top_k, H)), None),
    }  # fmt: skip
    result = {}
    for name, (fn, flops) in parts.items():
        try:
            ms = time_ms(fn, quick=True)
            result[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12 if flops else None}
        except Exception as error:
            result[name] = {"ms": None, "error": error_text(error)}
    # The transposed weights read in place against a contiguous transposed copy (not kept).
    for name, weight, rows, gather, flops in (("bwd dh GEMM (W_down^T copy)", down, grad_out, True, gemm_flops["down"]),
                                              ("bwd dx GEMM (W_gate_up^T copy)", gate_up, d_pre, False,
                                               gemm_flops["gate_up"])):  # fmt: skip
        try:
            copy = weight.transpose(1, 2).contiguous()
            ms = time_ms(lambda: grouped_matmul(rows, copy, plan, gather=gather, scatter=not gather), quick=True)
            result[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
            del copy
        except Exception as error:
            result[name] = {"ms": None, "error": error_text(error)}
    return result


# select_weight_grad_config's pick before the pair-id prefetch, on the former main loop (its 3 and
# 4 stages compiled alike: one step of copies in flight) with the scale in registers. Not the
# former kernel to the bit: it shares the constexpr k' and the unmasked even K / N.
FORMER_WEIGHT_GRAD_CONFIG = WeightGradConfig(128, 128, 64, 8, 4, prefetch_rows=False, prescale=False)
# The sweep's shapes, by name prefix: long row loops (T=8192: 1241 rows an expert), then short
# ones (Qwen3 prefill: 256; competition T=2048: 310).
SWEEP_SHAPES = ("competition-2", "qwen3", "competition-0")


def sweep_shapes(shapes: list[Shape], smoke: bool) -> list[Shape]:
    if smoke:
        return shapes[:1]
    return [s for prefix in SWEEP_SHAPES for s in shapes if s.name.startswith(prefix)]


def weight_grad_candidates(smoke: bool) -> list[WeightGradConfig]:
    """Configs timed after ``select_weight_grad_config``'s pick (one launching the same kernel
    as an earlier one skipped: ``prescale`` only matters to dW_down)."""
    C = WeightGradConfig
    if smoke:
        return [C(16, 16, 16, 4, 2, prescale=False), C(32, 16, 16, 4, 3), C(16, 16, 16, 4, 2, prefetch_rows=False)]
    return [
        FORMER_WEIGHT_GRAD_CONFIG,  # the reference
        C(128, 128, 64, 4, 3, prefetch_rows=False, prescale=False),  # the former main loop's best in its last sweep
        C(128, 256, 64, 8, 4),  # long row loops: one program an SM, 192 KiB
        C(128, 256, 64, 8, 4, prescale=False),  # the same, scaling in registers
        C(128, 256, 64, 8, 3),
        C(128, 256, 32, 8, 5),
        C(256, 128, 64, 8, 3),
        C(128, 128, 64, 8, 3),  # short row loops: two programs an SM, 96 KiB
        C(128, 128, 64, 8, 3, prescale=False),  # the same, scaling in registers (150 registers: one an SM)
        C(128, 128, 64, 8, 4),
        C(128, 128, 32, 8, 5),
        C(128, 128, 64, 4, 3),
        # The sorted operand through TMA descriptors bounded at the expert's rows; the dW
        # tiles stored through one as well.
        C(128, 256, 64, 8, 3, sorted_tma=True),
        C(128, 256, 64, 8, 3, sorted_tma=True, out_tma=True),
        C(128, 256, 64, 8, 4, sorted_tma=True, out_tma=True),
        C(128, 128, 64, 4, 3, sorted_tma=True),
        C(128, 128, 64, 4, 3, sorted_tma=True, out_tma=True),
        C(128, 128, 64, 4, 4, sorted_tma=True, out_tma=True),
    ]


# The sweep's launches: dW_down as the backward computes it with long row loops (its transpose,
# the gathered dout on the left, into d_down's transposed view), the other orientation (w h on
# the left, scaled by a row_scale here: the only launch where prescale matters), and dW_gate_up.
LAUNCHES = ("dW_down", "dW_down h-left", "dW_gate_up")
SCALED_LAUNCHES = ("dW_down h-left",)


def same_kernel(config, configs, *, scaled: bool):
    """The first of ``configs`` that launches what ``config`` launches (``prescale`` aside when
    the launch has no row scale), else None; configs may be dataclasses or their dicts."""

    def key(c) -> dict:
        fields = dict(c if isinstance(c, dict) else asdict(c))
        if not scaled:
            fields.pop("prescale", None)
        return fields

    return next((other for other in configs if key(other) == key(config)), None)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` one expert at a time in float32 (the weight
    gradients are too large for a float64 copy)."""
    num, den = 0.0, 0.0
    for a, e in zip(actual, expected):
        num += float(torch.linalg.vector_norm(a.float() - e.float())) ** 2
        den += float(torch.linalg.vector_norm(e.float())) ** 2
    return math.sqrt(num / max(den, 1e-30))


def tma_variants(config: WeightGradConfig) -> list[WeightGradConfig]:
    """``config`` with its sorted operand through TMA, and its output too (``--sweep-set tma``)."""
    return [dataclasses.replace(config, sorted_tma=True), dataclasses.replace(config, sorted_tma=True, out_tma=True)]


def sweep_weight_grad(shape: Shape, device: torch.device, smoke: bool, deadline: float, only_tma: bool = False) -> dict:
    """The weight-gradient configs of :func:`weight_grad_candidates` on the :data:`LAUNCHES` of
    ``shape``, after ``select_weight_grad_config``'s pick (the ``default``); none started after
    ``deadline`` (``time.perf_counter()``). Each output is compared with the default's
    (``rel_diff``: a wrong kernel is off by O(1), a different summation order by ~1e-3)."""
    inputs, grad_out = make_inputs(shape, device)
    x, expert_ids, expert_weights, gate_up, down, E = inputs
    T, H, D, S = shape.T, shape.H, shape.D, shape.S
    P = T * shape.top_k
    plan = build_dispatch_plan(expert_ids, E, num_shared_experts=S, check_ids=False)
    pair_weights = torch.cat([expert_weights, torch.ones(T, S, device=x.device)], dim=1).reshape(-1)
    hidden = torch.randn(P, D, device=device, dtype=x.dtype)
    d_pre = torch.randn(P, 2 * D, device=device, dtype=x.dtype)
    rows_per_expert = P / (E + S)
    scaled_hidden = (hidden.float() * pair_weights[plan.sorted_to_pair.long()][:, None]).to(hidden.dtype)
    launches = {
        "dW_down": (lambda c: grouped_weight_grad(grad_out, scaled_hidden, plan, a_rows="tokens", config=c,
                                                  out=torch.empty_like(down).transpose(1, 2)), 2 * P * D * H, (H, D)),
        "dW_down h-left": (lambda c: grouped_weight_grad(hidden, grad_out, plan, b_rows="tokens",
                                                         row_scale=pair_weights, config=c), 2 * P * D * H, (D, H)),
        "dW_gate_up": (lambda c: grouped_weight_grad(x, d_pre, plan, a_rows="tokens", config=c), 2 * P * H * 2 * D,
                       (H, 2 * D)),
    }  # fmt: skip
    result: dict = {"shape": shape.name, "rows_per_expert": rows_per_expert, "scaled": sorted(SCALED_LAUNCHES)}
    for name, (run, flops, (K, N)) in launches.items():
        default = select_weight_grad_config(K, N, x.dtype, rows_per_expert=rows_per_expert)
        configs = []
        candidates = tma_variants(default) if only_tma else weight_grad_candidates(smoke)
        for config in [default, *candidates]:
            if same_kernel(config, configs, scaled=name in SCALED_LAUNCHES) is None:
                configs.append(config)
        entries, expected = [], None
        for config in configs:
            if time.perf_counter() > deadline:
                break
            entry = {"config": asdict(config)}
            try:
                out = run(config)
                if expected is None:
                    expected = out
                else:
                    entry["rel_diff"] = relative_difference(out, expected)
                del out
                entry["ms"] = time_ms(lambda: run(config), quick=True)
                entry["tflops"] = flops / (entry["ms"] * 1e-3) / 1e12
            except Exception as error:  # out of shared memory or registers
                entry.update(ms=None, error=error_text(error))
            entries.append(entry)
        del expected
        free_memory()
        timed = [e for e in entries if e["ms"] is not None and e.get("rel_diff", 0.0) < 2e-2]
        result[name] = {"default": entries[0] if entries else {}, "candidates": entries[1:],
                        "best": min(timed, key=lambda e: e["ms"]) if timed else None}  # fmt: skip
    del inputs, grad_out, hidden, d_pre, scaled_hidden
    free_memory()
    return result


def config_text(config: dict) -> str:
    """``WeightGradConfig(...)`` as it would be written in the source."""
    defaults = {"prefetch_rows": True, "prescale": True, "sorted_tma": False, "out_tma": False}
    fields = [f"{k}={v}" for k, v in config.items() if k not in defaults or v != defaults[k]]
    return f"WeightGradConfig({', '.join(fields)})"


def config_short(config: dict) -> str:
    """``128x256x64 w8 s4`` (+ ``former``: prefetch_rows off, ``in-reg``: prescale off, ``tma`` /
    ``out-tma``: sorted operand / output through TMA)."""
    text = f"{config['block_k']}x{config['block_n']}x{config['block_m']} w{config['num_warps']} s{config['num_stages']}"
    text += ("" if config["prefetch_rows"] else " former") + ("" if config["prescale"] else " in-reg")
    return text + (" tma" if config.get("sorted_tma") else "") + (" out-tma" if config.get("out_tma") else "")


def weight_grad_choice(sweeps: list[dict]) -> list[str]:
    """Per row-loop regime (mean rows an expert below or from ``WIDE_TILE_MIN_ROWS``, where
    ``select_weight_grad_config`` switches tiles): the config with the lowest geomean time over
    that regime's launches (configs timed on all of them), against the heuristic's picks."""
    lines = []
    for regime, keep in (("long", lambda r: r >= WIDE_TILE_MIN_ROWS), ("short", lambda r: r < WIDE_TILE_MIN_ROWS)):
        cases = [(s["shape"], launch, s[launch]) for s in sweeps
                 if "rows_per_expert" in s and keep(s["rows_per_expert"])
                 for launch in LAUNCHES if launch in s]  # fmt: skip
        if not cases:
            continue
        times: dict[str, list[float]] = {}
        for _, launch_name, launch in cases:
            for entry in [launch["default"], *launch["candidates"]]:
                if entry.get("ms") is not None and entry.get("rel_diff", 0.0) < 2e-2:
                    # Without a row scale, prescale launches the same kernel: count it for both.
                    prescales = [entry["config"]["prescale"]] if launch_name in SCALED_LAUNCHES else [False, True]
                    for prescale in prescales:
                        times.setdefault(json.dumps({**entry["config"], "prescale": prescale}), []).append(entry["ms"])
        complete = {k: v for k, v in times.items() if len(v) == len(cases)}
        if not complete:
            continue
        best_key = min(complete, key=lambda k: geomean(complete[k]))
        best = geomean(complete[best_key])
        heuristic = ", ".join(
            f"{shape} {launch_name} {config_text(launch['default']['config'])} "
            f"x{(launch['default'].get('ms') or math.nan) / launch['best']['ms']:.2f}"
            for shape, launch_name, launch in cases if launch.get("best") and launch.get("default")
        )  # fmt: skip
        shapes = sorted({shape for shape, _, _ in cases})
        lines.append(
            f"- {regime} row loops ({'; '.join(shapes)}): ready to commit {config_text(json.loads(best_key))} "
            f"(geomean {best:.3f} ms over {len(cases)} launches); heuristic's picks vs the per-launch best: {heuristic}"
        )
        for other_key in sorted(complete, key=lambda k: geomean(complete[k]))[1:4]:
            lines.append(f"  - then {config_text(json.loads(other_key))}: x{geomean(complete[other_key]) / best:.2f}")
    return lines


# --------------------------------------------------------------------------------------
# 3. report
# --------------------------------------------------------------------------------------


def fmt(value, spec=".3f", suffix="") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


CHECK_HEADER = (
    "| shape | rel-L2 vs fp32: triton (out / dx / dw / dW_gate_up / dW_down) | torch path | worst ratio | "
    "recompute=True: rel-L2 | worst ratio | reproducible | no sync | empty experts 0 | ok |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def check_row(check: dict) -> str:
    def errors(name):
        values = check.get(f"rel_l2_{name}_vs_fp32")
        return " / ".join(f"{values[n]:.1e}" for n in NAMES) if values else check.get(f"{name}_error", "n/a")

    return (
        f"| {check['shape']} | {errors('triton')} | {errors('torch')} | {fmt(check.get('worst_ratio'), '.2f')} "
        f"| {errors('recompute')} | {fmt(check.get('recompute_worst_ratio'), '.2f')} "
        f"| {check.get('bitwise_reproducible')} | {check.get('no_host_sync')} | {check.get('empty_expert_grads_zero')} "
        f"| {'ok' if check['ok'] else 'FAIL ' + check.get('error', '')} |"
    )


TIME_HEADER = (
    "| shape | T | triton ms | TFLOP/s | % peak | grouped_mm ms | TFLOP/s | % peak | speed-up | fwd ms triton / gmm "
    "| saved B/token triton / gmm | peak MiB triton / gmm | peak less grads MiB triton / gmm | ratio |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def time_row(row: dict) -> str:
    def pair(key, spec=".0f"):
        return f"{fmt(row.get(f'triton_{key}'), spec)} / {fmt(row.get(f'grouped_mm_{key}'), spec)}"

    errors = " ".join(row[k] for k in ("error", "triton_error", "grouped_mm_error") if k in row)
    return (
        f"| {row['shape']} | {row['T']} | {fmt(row.get('triton_ms'))} | {fmt(row.get('triton_tflops'), '.0f')} "
        f"| {fmt(row.get('triton_pct_peak'), '.0f', '%')} | {fmt(row.get('grouped_mm_ms'))} "
        f"| {fmt(row.get('grouped_mm_tflops'), '.0f')} | {fmt(row.get('grouped_mm_pct_peak'), '.0f', '%')} "
        f"| {fmt(row.get('speedup'), '.2f', 'x')} | {pair('forward_ms', '.3f')} | {pair('saved_bytes_per_token')} "
        f"| {pair('peak_mib')} | {pair('peak_less_grads_mib')} | {fmt(row.get('activation_memory_ratio'), '.2f')} |"
        + (f" {errors}" if errors else "")
    )


RECOMPUTE_HEADER = (
    "| shape | recompute ms | TFLOP/s | speed-up | saved B/token | peak less grads MiB | ratio |\n"
    "|---|---|---|---|---|---|---|"
)


def recompute_row(row: dict) -> str:
    return (
        f"| {row['shape']} | {fmt(row.get('recompute_ms'))} | {fmt(row.get('recompute_tflops'), '.0f')} "
        f"| {fmt(row.get('recompute_speedup'), '.2f', 'x')} | {fmt(row.get('recompute_saved_bytes_per_token'), '.0f')} "
        f"| {fmt(row.get('recompute_peak_less_grads_mib'), '.0f')} "
        f"| {fmt(row.get('recompute_activation_memory_ratio'), '.2f')} |" + (f" {row['recompute_error']}"
                                                                            if "recompute_error" in row else "")
    )  # fmt: skip


def parts_lines(row: dict) -> list[str]:
    parts = row.get("parts") or {}
    cells = ", ".join(
        f"{name} {fmt(v.get('ms'))} ms" + (f" ({v['tflops']:.0f} TFLOP/s)" if v.get("tflops") else "")
        for name, v in parts.items()
    )
    return [f"- {row['shape']}: {cells or row.get('parts_error', 'n/a')}"]


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder (or .json path) for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself")
    parser.add_argument("--only", default=None, help="run only shapes whose name contains this text")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--sweep-set", choices=("all", "tma"), default="all",
                        help="weight-gradient configs to sweep: the candidate list, or the default's TMA variants")
    args = parser.parse_args()
    started = time.perf_counter()
    picked = pick_device(args.smoke)
    if picked is None:
        return 2
    device, gpu = picked
    print(f"# moeflux experts forward + backward on {gpu}; torch {torch.__version__}, triton {triton.__version__}\n")
    peak = dense_peak_tflops(device, args.smoke)
    print(f"dense peak (torch 8192^3 bfloat16 matmul): {peak:.0f} TFLOP/s\n")
    sys.stdout.flush()

    check_shapes, timing_shapes = load_shapes(args.smoke)
    selected = lambda shapes: [s for s in shapes if args.only is None or args.only in s.name]  # noqa: E731
    checks = []
    if not args.skip_checks:
        print(CHECK_HEADER)
        for shape in selected(check_shapes):
            checks.append(check_shape(shape, device))
            print(check_row(checks[-1]))
            sys.stdout.flush()
    rows = []
    print(f"\n{TIME_HEADER}")
    for shape in selected(timing_shapes):
        rows.append(time_shape(shape, device, peak))
        print(time_row(rows[-1]))
        sys.stdout.flush()
    sweeps = []
    for shape in sweep_shapes(selected(timing_shapes), args.smoke):
        if args.skip_sweep or time.perf_counter() - started > BUDGET_S:
            break
        try:
            sweeps.append(sweep_weight_grad(shape, device, args.smoke, started + BUDGET_S + 60,
                                            only_tma=args.sweep_set == "tma"))  # fmt: skip
        except Exception as error:
            sweeps.append({"shape": shape.name, "error": error_text(error)})
        free_memory()

    checks_ok = all(c["ok"] for c in checks)
    speedup = geomean(r.get("speedup") for r in rows)
    memory_ratio = geomean(r.get("activation_memory_ratio") for r in rows)
    recompute_speedup = geomean(r.get("recompute_speedup") for r in rows)
    recompute_memory_ratio = geomean(r.get("recompute_activation_memory_ratio") for r in rows)
    sweep_lines = []
    for sweep in sweeps:
        for launch in LAUNCHES:
            if launch in sweep and sweep[launch]["best"]:
                best, default = sweep[launch]["best"], sweep[launch]["default"]
                entries = [default, *sweep[launch]["candidates"]]
                former = same_kernel(FORMER_WEIGHT_GRAD_CONFIG, [e["config"] for e in entries],
                                     scaled=launch in SCALED_LAUNCHES)  # fmt: skip
                former = next((e for e in entries if e["config"] is former), {})
                sweep_lines.append(
                    f"- {sweep['shape']} {launch}: default {fmt(default.get('ms'))} ms "
                    f"({fmt(default.get('tflops'), '.0f')} TFLOP/s), former main loop {fmt(former.get('ms'))} ms, "
                    f"best {best['ms']:.3f} ms ({best['tflops']:.0f} TFLOP/s) with {config_text(best['config'])}"
                )
                timed = sorted((e for e in entries if e.get("ms") is not None), key=lambda e: e["ms"])
                sweep_lines.append("  - all (ms): " + ", ".join(
                    f"{config_short(e['config'])} {e['ms']:.3f}" for e in timed))  # fmt: skip
                failed = [e for e in [default, *sweep[launch]["candidates"]]
                          if e.get("error") or e.get("rel_diff", 0.0) >= 2e-2]  # fmt: skip
                for entry in failed:
                    why = entry.get("error") or f"rel_diff {entry['rel_diff']:.1e} against the default"
                    sweep_lines.append(f"  - {config_text(entry['config'])}: {why}")
            elif "error" in sweep:
                sweep_lines.append(f"- {sweep['shape']}: {sweep['error']}")
    summary = "\n".join([
        f"moeflux experts forward + backward on {gpu} (bfloat16; dense peak {peak:.0f} TFLOP/s); checks: "
        f"{'all passed' if checks_ok else 'FAILURES'}",
        "", CHECK_HEADER, *map(check_row, checks), "", TIME_HEADER, *map(time_row, rows), "",
        f"geomean speed-up over torch._grouped_mm autograd: {fmt(speedup, '.2f', 'x')}; geomean activation-memory "
        f"ratio (peak less grads): {fmt(memory_ratio, '.2f')}", "",
        "recompute=True (no pre-activations saved; the backward recomputes them band by band), against the same "
        "torch._grouped_mm autograd MoE:", "", RECOMPUTE_HEADER, *map(recompute_row, rows), "",
        f"geomean speed-up: {fmt(recompute_speedup, '.2f', 'x')}; geomean activation-memory ratio: "
        f"{fmt(recompute_memory_ratio, '.2f')}", "", "parts of the Triton step (default configs):",
        *[line for r in rows for line in parts_lines(r)], "", "weight-gradient sweep:", *sweep_lines, "",
        "weight-gradient choice:", *weight_grad_choice(sweeps), "",
    ])  # fmt: skip
    print("\n" + summary)
    report = {
        **run_info(gpu), "dense_peak_tflops_bf16": peak, "checks_ok": checks_ok, "checks": checks,
        "results": rows, "geomean_speedup": speedup, "geomean_activation_memory_ratio": memory_ratio,
        "recompute_geomean_speedup": recompute_speedup, "recompute_geomean_activation_memory_ratio": recompute_memory_ratio,
        "weight_grad_sweeps": sweeps, "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    json_path = report_path(args.out, "moe_train_gpu.json")
    write_report(json_path, report, summary)
    print(f"wrote {json_path} ({report['wall_s']:.0f} s)")
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
