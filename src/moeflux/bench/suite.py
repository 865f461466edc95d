"""``moeflux bench`` (time per call, side by side) and ``moeflux check`` (correctness)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from moeflux import gpumode
from moeflux.bench.shapes import Shape
from moeflux.bench.timing import Progress, environment, summarize, time_ms
from moeflux.config import MoEConfig
from moeflux.layer import moe
from moeflux.weights import MoEWeights

# The competition's pass/fail rule: allclose to the fp16 reference at rtol = atol = 1e-2.
CHECK_RTOL = CHECK_ATOL = 1e-2


@dataclass
class Case:
    """One shape's inputs on a device: the seed-format data and the packed weights."""

    shape: Shape
    data: gpumode.SeedData
    config: MoEConfig
    weights: MoEWeights

    @classmethod
    def build(cls, shape: Shape, device: torch.device, dtype: torch.dtype) -> "Case":
        x, seed_weights, seed_config = gpumode.generate_input(**shape.seed_args(), device=device)
        if dtype != torch.float16:
            x = x.to(dtype)
            seed_weights = {key: value.to(dtype) for key, value in seed_weights.items()}
        config = MoEConfig.from_seed_config(seed_config)
        return cls(shape, (x, seed_weights, seed_config), config, MoEWeights.from_seed_weights(seed_weights, config))

    def run_moeflux(self, backend: str) -> torch.Tensor:
        with torch.no_grad():
            return moe(self.data[0], self.weights, self.config.top_k, backend=backend)[0]


def systems_for(device: torch.device) -> list[str]:
    """Systems timed by default: the seed reference and each moeflux backend that runs here."""
    return ["seed-reference", "moeflux-torch"] + (["moeflux-triton"] if device.type == "cuda" else [])


def _call(case: Case, system: str):
    if system == "seed-reference":
        return lambda: gpumode.ref_kernel(case.data)
    if system.startswith("moeflux-"):
        backend = system.removeprefix("moeflux-")
        return lambda: case.run_moeflux(backend)
    raise ValueError(f"unknown system {system!r}")


@dataclass
class Report:
    kind: str
    env: dict
    rows: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        env = self.env
        head = f"{self.kind} on {env['device']} (torch {env['torch']}, triton {env['triton']}), {env['date']}, commit {env['commit']}\n\n"
        if not self.rows:
            return head + "(no rows)\n"
        columns = list(self.rows[0].keys())
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
        return head + "\n".join(lines) + "\n"

    def save(self, out_dir: str, stem: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump({"kind": self.kind, "env": self.env, "rows": self.rows}, f, indent=1)
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(self.markdown())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def run_bench(
    shapes: list[Shape], device: torch.device, dtype: torch.dtype, systems: list[str], *, warmup: int, repeat: int
) -> Report:
    report = Report("moeflux bench", environment(device))
    progress = Progress(len(shapes) * len(systems), "bench")
    for shape in shapes:
        case = Case.build(shape, device, dtype)
        baseline_ms = None
        for system in systems:
            stats = summarize(time_ms(_call(case, system), device, warmup=warmup, repeat=repeat))
            baseline_ms = baseline_ms or stats["median_ms"]
            report.rows.append(
                {
                    "shape": shape.name,
                    "T": shape.tokens,
                    "system": system,
                    "median_ms": stats["median_ms"],
                    "p5_ms": stats["p5_ms"],
                    "p95_ms": stats["p95_ms"],
                    "TFLOP/s": shape.flops() / stats["median_ms"] / 1e9,
                    "speedup_vs_ref": baseline_ms / stats["median_ms"],
                }
            )
            progress.step(f"{shape.name} {system}")
        del case
    return report


def run_check(shapes: list[Shape], device: torch.device, dtype: torch.dtype, backends: list[str]) -> Report:
    """Each backend vs the seed reference in ``dtype`` (the competition's allclose rule) and,
    for information, its relative L2 error against the seed reference run in float32."""
    report = Report("moeflux check", environment(device))
    progress = Progress(len(shapes) * len(backends), "check")
    for shape in shapes:
        case = Case.build(shape, device, dtype)
        expected = gpumode.ref_kernel(case.data)
        x, seed_weights, seed_config = case.data
        wide = {key: value.float() for key, value in seed_weights.items()}
        expected_fp32 = gpumode.ref_kernel((x.float(), wide, seed_config))
        for backend in backends:
            out = case.run_moeflux(backend)
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
