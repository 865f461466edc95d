"""``moeflux bench`` (every system side by side on every shape) and ``moeflux check`` (correctness)."""

from __future__ import annotations

import gc

import torch

from moeflux import gpumode
from moeflux.bench.calibrate import DevicePeaks, measure_peaks
from moeflux.bench.cases import MoECase, build_case
from moeflux.bench.metrics import errors, load_summary, throughput
from moeflux.bench.results import BenchResults, Report
from moeflux.bench.shapes import AnyShape, Shape
from moeflux.bench.systems import BASELINES, System, make_system
from moeflux.bench.timing import Progress, environment, peak_memory_mb, summarize, time_ms

# The competition's pass/fail rule: allclose to the fp16 reference at rtol = atol = 1e-2.
CHECK_RTOL = CHECK_ATOL = 1e-2

# The seed reference is timed by default only where one call should take at most this long:
# it runs a GEMM chain per expert, so assume 25% of the GEMM peak plus ~50 us per expert.
SEED_REFERENCE_BUDGET_MS = 100.0


class ShapeDoesNotFit(RuntimeError):
    pass


def seed_reference_estimate_ms(shape: Shape, peaks: DevicePeaks) -> float:
    return 4 * shape.flops() / (peaks.gemm_tflops * 1e9) + 0.05 * shape.nroutedexperts


def check_fits(shape: AnyShape, device: torch.device, itemsize: int) -> None:
    """Raise :class:`ShapeDoesNotFit`, saying how much memory the shape needs, when it cannot fit."""
    if device.type != "cuda":
        return
    needed = shape.memory_needed(itemsize)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    if needed > free:
        raise ShapeDoesNotFit(
            f"{shape.name} needs about {needed / 2**30:.1f} GiB of GPU memory; {free / 2**30:.1f} GiB of "
            f"{total / 2**30:.0f} GiB is free. Use fewer tokens or experts, or a GPU with more memory."
        )


def _out_of_memory_note(shape: AnyShape, itemsize: int) -> str:
    return f"out of GPU memory: {shape.name} needs about {shape.memory_needed(itemsize) / 2**30:.1f} GiB"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(
    shapes: list[AnyShape],
    device: torch.device,
    dtype: torch.dtype,
    system_names: list[str],
    *,
    mode: str = "forward",
    warmup: int = 3,
    repeat: int = 20,
    with_seed_reference: bool = False,
    preset: str = "custom",
) -> BenchResults:
    """Time every system on every shape; see :mod:`moeflux.bench.metrics` for each column."""
    itemsize = dtype.itemsize
    peaks = measure_peaks(device, dtype)
    workload = shapes[0].workload
    systems = [make_system(name) for name in system_names]
    results = BenchResults(
        env=environment(device),
        settings={
            "preset": preset, "workload": workload, "dtype": str(dtype).removeprefix("torch."), "mode": mode,
            "warmup": warmup, "repeat": repeat, "timer": "CUDA events" if device.type == "cuda" else "perf_counter",
            "systems": [system.name for system in systems],
        },  # fmt: skip
        calibration=peaks.as_dict(),
    )
    usable = []
    for system in systems:
        if getattr(system, "workload", "moe") != workload:
            system.note = f"runs the {system.workload} workload, not {workload}"
        elif system.available(device):
            usable.append(system)
        results.systems.append({"name": system.name, "description": getattr(system, "description", ""),
                                "available": system in usable, "note": system.note})  # fmt: skip
        if system not in usable:
            results.rows.extend(_row(shape, system.name, "skipped", system.note) for shape in shapes)

    progress = Progress(len(shapes) * len(usable), f"bench {preset}")
    for shape in shapes if usable else []:  # nothing runs here: build no inputs
        try:
            check_fits(shape, device, itemsize)
            case = build_case(shape, device, dtype)
            reference = case.reference()
            load = case.expert_load()
        except (ShapeDoesNotFit, torch.cuda.OutOfMemoryError) as error:
            note = str(error) if isinstance(error, ShapeDoesNotFit) else _out_of_memory_note(shape, itemsize)
            results.rows.extend(_row(shape, system.name, "skipped", note) for system in usable)
            for system in usable:
                progress.step(f"{shape.name} {system.name} (skipped)")
            _free(device)
            continue
        flops, bytes_moved = shape.flops(mode), shape.bytes_moved(itemsize, int((load > 0).sum()), mode)
        summary = load_summary(load)
        results.shapes.append({
            "name": shape.name, "workload": shape.workload, "layer": shape.layer, "tokens": shape.tokens,
            "params": shape.params(), "flops": flops, "bytes": bytes_moved,
            "floor_ms": peaks.floor_ms(flops, bytes_moved), **summary,
        })  # fmt: skip
        for system in usable:
            results.rows.append(
                _time_system(system, case, reference, mode, device, warmup, repeat, peaks, flops, bytes_moved,
                             skip_note=_seed_reference_skip(system, shape, peaks, with_seed_reference))
            )  # fmt: skip
            progress.step(f"{shape.name} {system.name}")
        del case, reference
        _free(device)
    progress.close()
    results.finish(BASELINES.get(workload, []))
    return results


def _seed_reference_skip(system: System, shape: AnyShape, peaks: DevicePeaks, forced: bool) -> str:
    if system.name != "seed-reference" or forced or not isinstance(shape, Shape):
        return ""
    estimate = seed_reference_estimate_ms(shape, peaks)
    if estimate <= SEED_REFERENCE_BUDGET_MS:
        return ""
    return f"would take ~{estimate:.0f} ms a call here; pass --with-seed-reference to time it"


def _row(shape: AnyShape, system: str, status: str, note: str = "") -> dict:
    return {"shape": shape.name, "layer": shape.layer, "T": shape.tokens, "system": system, "status": status,
            "note": note}  # fmt: skip


def _time_system(
    system: System,
    case,
    reference: torch.Tensor,
    mode: str,
    device: torch.device,
    warmup: int,
    repeat: int,
    peaks: DevicePeaks,
    flops: int,
    bytes_moved: int,
    *,
    skip_note: str = "",
) -> dict:
    shape = case.shape
    if mode == "train" and not getattr(system, "trains", True):
        skip_note = "forward only"
    if skip_note:
        return _row(shape, system.name, "skipped", skip_note)
    leaves: list[torch.Tensor] = []
    try:
        system.prepare(case)
        with torch.no_grad():
            accuracy = errors(system(), reference)
        if mode == "train":
            leaves = [leaf for leaf in system.leaves() if leaf.is_leaf and leaf.is_floating_point()]
            for leaf in leaves:
                leaf.requires_grad_(True)
            # A fixed upstream gradient, as a loss would send; drawn once per system.
            generator = torch.Generator(device=device).manual_seed(0)
            grad_out = torch.randn(reference.shape, device=device, generator=generator).to(reference.dtype)

            def call():
                out = system()
                return torch.autograd.grad(out, leaves, grad_out.view(out.shape), allow_unused=True)

        else:

            def call():
                with torch.no_grad():
                    return system()

        memory_mb = peak_memory_mb(call, device)
        stats = summarize(time_ms(call, device, warmup=warmup, repeat=repeat))
    except torch.cuda.OutOfMemoryError:
        return _row(shape, system.name, "error", _out_of_memory_note(shape, reference.element_size()))
    except Exception as error:  # noqa: BLE001 - one failing system must not stop the run; the row says why
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return _row(shape, system.name, "error", f"{type(error).__name__}: {message}"[:300])
    finally:
        for leaf in leaves:
            leaf.requires_grad_(False)
        system.release()
        _free(device)
    return {
        **_row(shape, system.name, "ok", system.note),
        **stats,
        "warmup": warmup,
        **throughput(flops, bytes_moved, shape.tokens, stats["median_ms"], peaks),
        "floor_ms": peaks.floor_ms(flops, bytes_moved),
        "peak_mem_mb": memory_mb,
        **accuracy,
    }


def run_check(shapes: list[Shape], device: torch.device, dtype: torch.dtype, backends: list[str]) -> Report:
    """Each backend vs the seed reference in ``dtype`` (the competition's allclose rule) and,
    for information, its relative L2 error against the seed reference run in float32."""
    from moeflux.layer import moe

    report = Report("moeflux check", environment(device))
    progress = Progress(len(shapes) * len(backends), "check")
    for shape in shapes:
        case = MoECase.build(shape, device, dtype)
        expected = gpumode.ref_kernel(case.seed_data)
        x, seed_weights, seed_config = case.seed_data
        wide = {key: value.float() for key, value in seed_weights.items()}
        expected_fp32 = gpumode.ref_kernel((x.float(), wide, seed_config))
        for backend in backends:
            with torch.no_grad():
                out = moe(case.x, case.weights, case.config.top_k, backend=backend)[0]
            passed = bool(torch.allclose(out, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL))
            mismatched = (~torch.isclose(out, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL)).sum().item()
            rel_l2 = ((out.float() - expected_fp32).norm() / expected_fp32.norm()).item()
            report.rows.append(
                {
                    "shape": shape.name,
                    "T": shape.tokens,
                    "backend": backend,
                    "dtype": str(dtype).removeprefix("torch."),
                    "passed": passed,
                    "mismatched": int(mismatched),
                    "max_abs_err": (out.float() - expected.float()).abs().max().item(),
                    "rel_l2_vs_fp32": rel_l2,
                }
            )
            progress.step(f"{shape.name} {backend}")
        del case
    return report
