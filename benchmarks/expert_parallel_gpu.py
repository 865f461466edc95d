"""GPU check and timing of expert parallelism (``moeflux.distributed``): EP over W GPUs vs one GPU.

    PYTHONPATH=src torchrun --nproc_per_node=2 benchmarks/expert_parallel_gpu.py --out $OUT
    PYTHONPATH=src python3 benchmarks/expert_parallel_gpu.py --out $OUT    # spawns one rank per GPU itself
    PYTHONPATH=src python3 benchmarks/expert_parallel_gpu.py --smoke --out /tmp/ep  # CPU, Gloo, tiny shapes

NCCL on the GPUs (one rank per GPU), bfloat16, the Triton kernels (``backend="auto"``).
Every rank holds its own ``T`` tokens (weak scaling: W GPUs run W times the tokens of one).

1. Checks (bfloat16): ``ExpertParallelMoE``'s output, ``dx`` and every weight gradient (its
   own experts' slices; the router's and the shared expert's summed over the ranks), and the
   single-GPU layer's (``moeflux.MoE`` with the whole weights, on the same rank's tokens),
   each against the torch path in float32 (no TF32); target: EP's rel-L2 no worse than
   ``RATIO_TARGET`` x the single GPU's. Shapes: the competition's tests (E = 4, 8), Qwen3-30B-A3B
   prefill (E = 128, k = 8), an uneven split (E = 9), a rank with no tokens.
2. Timing (bfloat16; per call: barrier, CUDA events, median of ``--reps`` calls; the slowest
   rank's median): the layer forward (inference, ``no_grad``) and a training step (forward +
   ``autograd.grad`` of x and every parameter), EP with ``overlap`` on and off, against one GPU
   running the whole layer on its ``T`` tokens. tokens/s: ``W T / t_EP`` vs ``T / t_1``. At the
   competition's benchmark shapes (E = 32, k = 4, S = 1, T = 2048 / 8192 / 8192) and the model
   shapes of ``moeflux/data/models.json`` (prefill and decode).
3. The forward split into phases, each timed alone between barriers: route, plan (counts
   all-to-all + the host sync), gather rows, rows all-to-all, weights all-to-all, shared expert,
   routed experts, combine all-to-all, combine sum; all-to-all = plan + the three exchanges,
   compute = the rest. The bytes each rank sends to other ranks and the rows all-to-all's
   bandwidth. The backward's exchanges move the same bytes in reverse.
4. JSON + Markdown under ``--out`` (rank 0 writes). Exit 1 if a check fails (every rank).

``--smoke``: tiny shapes; on the CPU with Gloo (and the torch backend) when fewer than 2 GPUs
are visible, so the script is tested in CI (tests/distributed/test_benchmark_smoke.py).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.resources
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from _common import git_commit, rel_l2, report_path, write_report
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import triton

import moeflux
from moeflux.distributed import ExpertParallelMoE, ExpertPartition, all_to_all, plan_exchange
from moeflux.ops.experts import run_experts
from moeflux.ops.routing import route

RATIO_TARGET = 1.5  # EP's rel-L2 against float32 at most this times the single GPU's
ERROR_FLOOR = 1e-6  # below this a single-GPU error counts as this (a ratio of two tiny numbers is noise)
BUDGET_S = 420.0  # no new timing shape after this many seconds of the run
NAMES = ("out", "dx", "d_router", "d_gate_up", "d_down", "d_shared_gate_up", "d_shared_down")


@dataclass(frozen=True)
class Shape:
    name: str
    T: int  # tokens per rank
    H: int
    D: int
    E: int
    S: int
    k: int
    seed: int
    empty_last_rank: bool = False  # the last rank has no tokens

    def tokens(self, rank: int, world_size: int) -> int:
        return 0 if self.empty_last_rank and rank == world_size - 1 else self.T

    @property
    def config(self) -> moeflux.MoEConfig:
        return moeflux.MoEConfig(self.H, self.D, self.E, self.k, num_shared_experts=self.S)

    @property
    def forward_flops(self) -> int:
        """Per rank: router ``2 T H E`` + experts ``2 T H 3D (k + S)``."""
        return 2 * self.T * self.H * (self.E + 3 * self.D * (self.k + self.S))


def load_shapes(smoke: bool) -> tuple[list[Shape], list[Shape]]:
    """``(check shapes, timing shapes)``."""
    if smoke:
        checks = [
            Shape("smoke-shared", 24, 32, 16, 4, 1, 2, 1),
            Shape("smoke-uneven-empty-rank", 16, 32, 16, 5, 0, 2, 2, empty_last_rank=True),
        ]
        return checks, [Shape("smoke-time", 32, 32, 16, 4, 1, 2, 3), Shape("smoke-decode", 2, 32, 16, 8, 1, 2, 4)]
    data = importlib.resources.files("moeflux") / "data"
    competition = json.loads((data / "competition.json").read_text())
    models = json.loads((data / "models.json").read_text())["shapes"]

    def shape(name, case, **kwargs):
        return Shape(name, case["bs"] * case["seqlen"], case["dhidden"], case["dexpert"], case["nroutedexperts"],
                     case["nsharedexperts"], case["nexpertspertoken"], case["seed"], **kwargs)  # fmt: skip

    checks = [shape(f"competition-test-{i} (E={c['nroutedexperts']}, T={c['bs'] * c['seqlen']})", c)
              for i, c in enumerate(competition["tests"])]  # fmt: skip
    checks += [shape(c["name"], c) for c in models if c["name"] == "qwen3-30b-a3b-prefill"]
    checks += [
        Shape("uneven-split (E=9, k=2)", 1024, 1024, 512, 9, 1, 2, 11),
        Shape("last-rank-no-tokens (E=8)", 512, 1024, 512, 8, 1, 2, 12, empty_last_rank=True),
    ]
    timing = [shape(f"competition-{i} (bs={c['bs']}, seq={c['seqlen']})", c)
              for i, c in enumerate(competition["benchmarks"])]  # fmt: skip
    timing += [shape(c["name"], c) for c in models]
    return checks, timing


# --------------------------------------------------------------------------------------
# ranks, devices, collective helpers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    device_name: str
    comm_backend: str  # "nccl" or "gloo"


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def all_ranks_agree(flag: bool) -> bool:
    """True when ``flag`` holds on every rank."""
    tensor = torch.tensor([0 if flag else 1], device=_comm_device())
    dist.all_reduce(tensor)
    return int(tensor) == 0


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def synchronize(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timed(ctx: Context, fn, reps: int, warmup: int = 3) -> float:
    """Median ms of ``fn`` over ``reps`` calls, each started together on every rank (barrier),
    timed with CUDA events (wall clock on the CPU); the slowest rank's median. Every rank
    makes the same calls, so collectives inside ``fn`` pair up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(ctx)
        dist.barrier()
        if ctx.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - began))
    return max_over_ranks(statistics.median(times))


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


# --------------------------------------------------------------------------------------
# inputs and layers
# --------------------------------------------------------------------------------------


def make_inputs(ctx: Context, shape: Shape, dtype: torch.dtype):
    """``(whole weights, x, grad_out)``: weights from ``shape.seed`` (the same on every rank),
    this rank's tokens and output gradient from ``seed`` and the rank."""
    generator = torch.Generator(device=ctx.device).manual_seed(shape.seed)
    weights = moeflux.MoEWeights.random(shape.config, device=ctx.device, dtype=dtype, generator=generator)
    generator.manual_seed(shape.seed * 1000 + ctx.rank + 1)
    T = shape.tokens(ctx.rank, ctx.world_size)
    x = torch.randn(T, shape.H, device=ctx.device, dtype=dtype, generator=generator)
    grad_out = torch.randn(T, shape.H, device=ctx.device, dtype=dtype, generator=generator)
    return weights, x, grad_out


def cast(weights: moeflux.MoEWeights, dtype: torch.dtype) -> moeflux.MoEWeights:
    return moeflux.MoEWeights(weights.router.to(dtype), weights.gate_up.to(dtype), weights.down.to(dtype))


def train_step(layer, x: torch.Tensor, grad_out: torch.Tensor):
    """``(out, dx, parameter grads by name)`` of one forward + backward."""
    x = x.detach().requires_grad_()
    params = dict(layer.named_parameters())
    out, _ = layer(x)
    grads = torch.autograd.grad(out, [x, *params.values()], grad_out, allow_unused=True)
    named = {name: g if g is not None else torch.zeros_like(p) for (name, p), g in zip(params.items(), grads[1:])}
    return out.detach(), grads[0], named


def single_gpu_grads(ctx: Context, layer: moeflux.MoE, x, grad_out, shape: Shape):
    """The single-GPU layer's ``[out, dx, d_router, d_gate_up (own slice), d_down (own slice),
    d_shared_gate_up, d_shared_down]``, weight gradients summed over the ranks (float32)."""
    out, dx, grads = train_step(layer, x, grad_out)
    summed = {}
    for name in ("router", "gate_up", "down"):
        g = grads[name].float()
        dist.all_reduce(g)
        summed[name] = g
    experts = ExpertPartition(shape.E, ctx.world_size).experts_of(ctx.rank)
    own = slice(experts.start, experts.stop)
    return [out, dx, summed["router"], summed["gate_up"][own], summed["down"][own],
            summed["gate_up"][shape.E:], summed["down"][shape.E:]]  # fmt: skip


def expert_parallel_grads(layer: ExpertParallelMoE, x, grad_out):
    """The same list for the expert-parallel layer (replicated gradients summed over the ranks)."""
    out, dx, grads = train_step(layer, x, grad_out)
    summed = {}
    for name in ("router", "shared_gate_up", "shared_down"):
        g = grads[name].float()
        dist.all_reduce(g)
        summed[name] = g
    return [out, dx, summed["router"], grads["gate_up"], grads["down"], summed["shared_gate_up"],
            summed["shared_down"]]  # fmt: skip


# --------------------------------------------------------------------------------------
# 1. checks
# --------------------------------------------------------------------------------------


def errors(values: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """Each rank's rel-L2 per tensor of ``NAMES``, the worst rank's (``out`` and ``dx`` differ
    per rank, the summed gradients are the same on all); 0 for a rank's empty tensors."""
    return {n: max_over_ranks(rel_l2(v, e) if e.numel() else 0.0) for n, v, e in zip(NAMES, values, reference)}


def check_shape(ctx: Context, shape: Shape, dtype: torch.dtype) -> dict:
    result: dict = {"shape": shape.name, **{key: getattr(shape, key) for key in ("T", "H", "D", "E", "S", "k")},
                    "empty_last_rank": shape.empty_last_rank}  # fmt: skip
    weights, x, grad_out = make_inputs(ctx, shape, dtype)
    exact = single_gpu_grads(ctx, moeflux.MoE(shape.config, cast(weights, torch.float32), backend="torch"),
                             x.float(), grad_out.float(), shape)  # fmt: skip
    single = single_gpu_grads(ctx, moeflux.MoE(shape.config, weights), x, grad_out, shape)
    ep_layer = ExpertParallelMoE(shape.config, weights=weights)
    ep = expert_parallel_grads(ep_layer, x, grad_out)
    again = expert_parallel_grads(ep_layer, x, grad_out)
    del weights, ep_layer

    result["rel_l2_ep_vs_fp32"] = errors(ep, exact)
    result["rel_l2_single_vs_fp32"] = errors(single, exact)
    result["rel_l2_ep_vs_single"] = errors(ep, single)
    result["ratio_ep_to_single"] = {
        n: result["rel_l2_ep_vs_fp32"][n] / max(result["rel_l2_single_vs_fp32"][n], ERROR_FLOOR) for n in NAMES
    }
    result["worst_ratio"] = max(result["ratio_ep_to_single"].values())
    result["finite"] = all_ranks_agree(all(bool(torch.isfinite(v).all()) for v in ep))
    result["bitwise_reproducible"] = all_ranks_agree(all(torch.equal(a, b) for a, b in zip(ep, again)))
    result["ok"] = bool(result["finite"] and result["bitwise_reproducible"] and result["worst_ratio"] <= RATIO_TARGET)
    del exact, single, ep, again
    free_memory(ctx)
    return result


# --------------------------------------------------------------------------------------
# 2. timing, 3. phases
# --------------------------------------------------------------------------------------


def peak_step_memory(ctx: Context, step) -> int | None:
    """Bytes of one training step beyond what was allocated before it (largest rank)."""
    if ctx.device.type != "cuda":
        return None
    free_memory(ctx)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(max_over_ranks(torch.cuda.max_memory_allocated() - before))


def time_shape(ctx: Context, shape: Shape, dtype: torch.dtype, reps: int) -> dict:
    result: dict = {"shape": shape.name, **{key: getattr(shape, key) for key in ("T", "H", "D", "E", "S", "k")}}
    weights, x, grad_out = make_inputs(ctx, shape, dtype)
    single = moeflux.MoE(shape.config, weights)
    ep_layers = {on: ExpertParallelMoE(shape.config, weights=weights, overlap=on) for on in (True, False)}
    del weights

    def forward(layer):
        def run():
            with torch.no_grad():
                layer(x)

        return run

    def step(layer):
        return lambda: train_step(layer, x, grad_out)

    ms = {
        "single_forward": timed(ctx, forward(single), reps),
        "single_step": timed(ctx, step(single), reps),
        "ep_forward": timed(ctx, forward(ep_layers[True]), reps),
        "ep_forward_no_overlap": timed(ctx, forward(ep_layers[False]), reps),
        "ep_step": timed(ctx, step(ep_layers[True]), reps),
        "ep_step_no_overlap": timed(ctx, step(ep_layers[False]), reps),
    }
    result["ms"] = ms
    W, T = ctx.world_size, shape.T
    result["tokens_per_s"] = {
        "single_forward": T / ms["single_forward"] * 1e3,
        "ep_forward": W * T / min(ms["ep_forward"], ms["ep_forward_no_overlap"]) * 1e3,
        "single_step": T / ms["single_step"] * 1e3,
        "ep_step": W * T / min(ms["ep_step"], ms["ep_step_no_overlap"]) * 1e3,
    }
    result["speedup_forward"] = result["tokens_per_s"]["ep_forward"] / result["tokens_per_s"]["single_forward"]
    result["speedup_step"] = result["tokens_per_s"]["ep_step"] / result["tokens_per_s"]["single_step"]
    result["overlap_gain_forward"] = ms["ep_forward_no_overlap"] / ms["ep_forward"]
    result["overlap_gain_step"] = ms["ep_step_no_overlap"] / ms["ep_step"]
    result["ep_tflops_per_gpu"] = shape.forward_flops / (ms["ep_forward"] * 1e-3) / 1e12
    result["peak_step_bytes"] = {
        "single": peak_step_memory(ctx, step(single)),
        "ep": peak_step_memory(ctx, step(ep_layers[True])),
    }
    result["phases"] = forward_phases(ctx, ep_layers[True], x, reps)
    del single, ep_layers
    free_memory(ctx)
    return result


def forward_phases(ctx: Context, layer: ExpertParallelMoE, x: torch.Tensor, reps: int) -> dict:
    """The EP forward as its pieces, each timed alone (see the module docstring, 3.)."""
    shard, config, partition = layer.shard, layer.config, layer.partition
    backend = "triton" if x.is_cuda else "torch"
    state: dict = {}

    def run_route():
        state["routing"] = route(F.linear(x, shard.router), config.top_k, router=config.router, backend=backend)

    def run_plan():
        routing = state["routing"]
        state["plan"] = plan_exchange(routing.expert_ids, partition, tokens_per_expert=routing.tokens_per_expert)

    def run_gather():
        plan = state["plan"]
        state["rows"] = x.index_select(0, plan.send_order // plan.top_k)
        state["weights"] = state["routing"].expert_weights.reshape(-1).index_select(0, plan.send_order)

    def run_rows_exchange():
        plan = state["plan"]
        state["recv_x"] = all_to_all(state["rows"], plan.recv_splits, plan.send_splits)

    def run_weights_exchange():
        plan = state["plan"]
        state["recv_weights"] = all_to_all(state["weights"], plan.recv_splits, plan.send_splits)

    def run_shared():
        shared = shard.shared_weights()
        if shared is not None:
            S, T = shard.num_shared_experts, x.shape[0]
            ids = torch.arange(S, device=x.device).expand(T, S)
            run_experts(x, ids, torch.ones(T, S, device=x.device), shared, backend=backend)

    def run_experts_local():
        plan = state["plan"]
        ids, weights = plan.recv_expert_ids[:, None], state["recv_weights"][:, None]
        state["expert_out"] = run_experts(state["recv_x"], ids, weights, shard.routed_weights(), backend=backend)

    def run_combine_exchange():
        plan = state["plan"]
        state["returned"] = all_to_all(state["expert_out"], plan.send_splits, plan.recv_splits)

    def run_combine_sum():
        plan = state["plan"]
        rows = state["returned"].index_select(0, plan.pair_to_send).view(plan.num_tokens, plan.top_k, -1)
        rows.sum(dim=1, dtype=torch.float32).to(x.dtype)

    phases = [
        ("route", run_route, "compute"), ("plan (counts all-to-all + host sync)", run_plan, "all-to-all"),
        ("gather rows", run_gather, "compute"), ("rows all-to-all", run_rows_exchange, "all-to-all"),
        ("weights all-to-all", run_weights_exchange, "all-to-all"), ("shared expert", run_shared, "compute"),
        ("routed experts", run_experts_local, "compute"), ("combine all-to-all", run_combine_exchange, "all-to-all"),
        ("combine sum", run_combine_sum, "compute"),
    ]  # fmt: skip
    result: dict = {"ms": {}, "kind": {}}
    with torch.no_grad():
        for _, fn, _ in phases:  # warm up in order (each phase reads the previous one's state)
            fn()
        for _ in range(reps):
            for name, fn, kind in phases:
                result["ms"].setdefault(name, []).append(timed(ctx, fn, 1, warmup=0))
                result["kind"][name] = kind
    result["ms"] = {name: statistics.median(values) for name, values in result["ms"].items()}
    result["all_to_all_ms"] = sum(ms for name, ms in result["ms"].items() if result["kind"][name] == "all-to-all")
    result["compute_ms"] = sum(ms for name, ms in result["ms"].items() if result["kind"][name] == "compute")
    plan = state["plan"]
    remote_pairs = sum(plan.send_splits) - plan.send_splits[ctx.rank]
    row_bytes = int(max_over_ranks(remote_pairs * x.shape[1] * x.element_size()))
    result["bytes_sent_to_other_ranks"] = row_bytes + int(max_over_ranks(remote_pairs * 4))  # rows + weights
    result["rows_all_to_all_GBps"] = row_bytes / (result["ms"]["rows all-to-all"] * 1e-3) / 1e9
    received = max_over_ranks(plan.num_received)
    mean_received = x.shape[0] * config.top_k  # every rank sends T k pairs; the mean rank receives as many
    result["max_received_over_mean"] = received / max(mean_received, 1)
    return result


# --------------------------------------------------------------------------------------
# 4. report
# --------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        f"# Expert parallelism: {report['world_size']} x {report['device']} ({report['comm_backend']}) vs one GPU",
        "",
        (
            f"torch {report['torch']}, triton {report['triton']}, {report['date']}, commit {report['commit']}, "
            f"{report['dtype']}, {report['world_size']} ranks, T tokens per rank (weak scaling)."
        ),
        "",
        "## Checks (rel-L2 against the float32 torch path; EP / single GPU)",
        "",
        "| shape | ok | worst EP/single ratio | out | dx | d_router | d_gate_up | d_down | d_shared |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["checks"]:
        if "error" in c:
            lines.append(f"| {c['shape']} | **FAIL** | {c['error']} | | | | | | |")
            continue
        ep, single = c["rel_l2_ep_vs_fp32"], c["rel_l2_single_vs_fp32"]
        cells = [f"{ep[n]:.2e} / {single[n]:.2e}" for n in NAMES[:6]]
        verdict = "yes" if c["ok"] else "**FAIL**"
        lines.append(f"| {c['shape']} | {verdict} | {c['worst_ratio']:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Throughput (tokens/s over all ranks; EP takes the faster of overlap on/off)",
        "",
        (
            "| shape | T/rank | 1 GPU fwd ms | EP fwd ms (overlap / off) | fwd speed-up | 1 GPU step ms "
            "| EP step ms (overlap / off) | step speed-up | peak step GiB (1 GPU / EP) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in report["timing"]:
        if "error" in t:
            lines.append(f"| {t['shape']} | {t.get('T', '')} | {t['error']} | | | | | | |")
            continue
        ms, peak = t["ms"], t["peak_step_bytes"]
        memory = (f"{peak['single'] / 2**30:.1f} / {peak['ep'] / 2**30:.1f}" if peak["single"] is not None else "")
        lines.append(
            f"| {t['shape']} | {t['T']} | {ms['single_forward']:.3f} | {ms['ep_forward']:.3f} / "
            f"{ms['ep_forward_no_overlap']:.3f} | {t['speedup_forward']:.2f}x | {ms['single_step']:.3f} | "
            f"{ms['ep_step']:.3f} / {ms['ep_step_no_overlap']:.3f} | {t['speedup_step']:.2f}x | {memory} |"
        )
    lines += [
        "",
        "## EP forward split (each phase alone, ms; slowest rank)",
        "",
        (
            "| shape | all-to-all ms | compute ms | phases | MB sent to other ranks | rows all-to-all GB/s "
            "| max received / mean |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for t in report["timing"]:
        if "phases" not in t:
            continue
        p = t["phases"]
        parts = ", ".join(f"{name} {ms:.3f}" for name, ms in p["ms"].items())
        lines.append(
            f"| {t['shape']} | {p['all_to_all_ms']:.3f} | {p['compute_ms']:.3f} | {parts} | "
            f"{p['bytes_sent_to_other_ranks'] / 1e6:.1f} | {p['rows_all_to_all_GBps']:.1f} | "
            f"{p['max_received_over_mean']:.2f} |"
        )
    lines.append("")
    lines.append(f"All checks pass: {report['all_checks_pass']}. Wall time {report['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def run(rank: int, world_size: int, args: argparse.Namespace, init_method: str | None) -> int:
    started = time.perf_counter()
    use_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    if use_gpus:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        device_name, comm_backend = torch.cuda.get_device_name(device), "nccl"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif args.smoke:
        device, device_name, comm_backend = torch.device("cpu"), "cpu", "gloo"
        torch.set_num_threads(1)
    else:
        print(f"needs {world_size} CUDA GPUs (or --smoke)", file=sys.stderr)
        return 2
    timeout = datetime.timedelta(seconds=120 if args.smoke else 600)
    kwargs = {"device_id": device} if comm_backend == "nccl" else {}
    dist.init_process_group(comm_backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                            timeout=timeout, **kwargs)  # fmt: skip
    ctx = Context(rank, world_size, device, device_name, comm_backend)
    dtype = torch.bfloat16
    checks_shapes, timing_shapes = load_shapes(args.smoke)
    if args.only:
        checks_shapes = [s for s in checks_shapes if args.only in s.name]
        timing_shapes = [s for s in timing_shapes if args.only in s.name]
    reps = 2 if args.smoke else args.reps
    try:
        checks = []
        for shape in checks_shapes:
            checks.append(check_shape(ctx, shape, dtype))
            if rank == 0:
                print(json.dumps(checks[-1]), flush=True)
        timing = []
        for shape in timing_shapes:
            # Rank 0's clock decides, so every rank takes the same shapes (collectives pair up).
            if not all_ranks_agree(rank != 0 or time.perf_counter() - started < args.budget_s):
                timing.append({"shape": shape.name, "T": shape.T, "error": "skipped: time budget spent"})
                continue
            timing.append(time_shape(ctx, shape, dtype, reps))
            if rank == 0:
                print(json.dumps(timing[-1]), flush=True)
        checks_ok = all(c.get("ok") for c in checks)
        if rank == 0:
            report = {
                "device": device_name, "world_size": world_size, "comm_backend": comm_backend,
                "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if comm_backend == "nccl" else None,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "commit": git_commit(), "dtype": str(dtype).replace("torch.", ""), "smoke": args.smoke,
                "ratio_target": RATIO_TARGET, "shapes": {"checks": [asdict(s) for s in checks_shapes],
                                                         "timing": [asdict(s) for s in timing_shapes]},
                "checks": checks, "timing": timing, "all_checks_pass": checks_ok,
                "wall_s": time.perf_counter() - started,
            }  # fmt: skip
            json_path = report_path(args.out, "expert_parallel_gpu.json")
            summary = markdown(report)
            write_report(json_path, report, summary)
            print(summary)
            print(f"wrote {json_path}")
        dist.barrier()
        return 0 if checks_ok else 1
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world_size: int, args: argparse.Namespace, init_method: str) -> None:
    code = run(rank, world_size, args, init_method)
    if code:
        sys.exit(code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder (or .json path) for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself (CPU: Gloo)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks to spawn without torchrun (default: GPUs, >= 2)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="no new timing shape after this")
    parser.add_argument("--only", default=None, help="run only shapes whose name contains this text")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
    world_size = args.nproc or max(2, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    try:
        mp.spawn(_spawned, args=(world_size, args, init_method), nprocs=world_size, join=True)
    except mp.ProcessExitedException as error:
        print(f"a rank failed: {error}", file=sys.stderr)
        return error.exit_code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
