"""GPU check and timing of ``moeflux.ops.flash_expert`` (Triton) against eager PyTorch.

    PYTHONPATH=src python3 benchmarks/flash_expert_gpu.py --out $OUT

1. Correctness: Triton forward and all four gradients against a float32 PyTorch reference
   (float32 and bfloat16, deterministic and atomic weight gradients, a hot expert, and a
   pool of E * H > 2**31 elements); rel-L2 errors are printed; exit status 1 if any fails.
2. Copy bandwidth: one large device-to-device copy, (bytes read + written) / time.
3. Timing (bfloat16, T = 8192, H in {1024, 2048}, K in {16, 64}, E in {65536, 1048576}):
   forward and forward+backward, medians of ``triton.testing.do_bench``, for
   * ``triton``: moeflux's kernels (deterministic backward; the atomic one as well);
   * ``eager``: ``moeflux.ops.flash_expert.naive`` (gathers rows, computes in float32);
   * ``eager_bf16``: the same gather with bf16 ``bmm`` (no float32 copies), a leaner baseline.
   Forward bytes = K gathered rows of both pools per token + input + output.
4. A Markdown table on stdout, JSON (and the table) under ``--out``.

``--smoke`` runs tiny shapes (also on the CPU with TRITON_INTERPRET=1) to check the script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.flash_expert.naive import flash_expert_torch

TIME_BUDGET_S = 200.0  # stop starting eager timings after this, to stay under 4 minutes
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


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


def check_case(name, T, H, E, K, dtype, deterministic, device, *, hot):
    hidden, down, up, indices, routing_weights = make_inputs(T, H, E, K, dtype, device, hot=hot)
    grad_out = torch.randn(T, H, device=device, dtype=dtype)
    used, *expected = reference_float32(hidden, down, up, indices, routing_weights, grad_out)

    def triton_run():
        leaves = [t.detach().requires_grad_() for t in (hidden, down, up, routing_weights)]
        out = flash_expert(*leaves[:3], indices, leaves[3], backend="triton", deterministic=deterministic)
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


def run_checks(device, smoke):
    if smoke:
        cases = [("uniform", 16, 40, 50, 3, False), ("hot + duplicates", 24, 33, 20, 4, True)]
    else:
        cases = [
            ("uniform", 512, 1024, 4096, 16, False),
            ("hot expert + duplicates, H = 1000", 4096, 1000, 1000, 8, True),
            ("E * H > 2**31 (int64 offsets)", 256, 2048, 1 << 20, 16, True),
        ]
    results = []
    for name, T, H, E, K, hot in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for deterministic in (True, False):
                try:
                    result = check_case(name, T, H, E, K, dtype, deterministic, device, hot=hot)
                except Exception as error:  # a failed compile or launch is a failed check
                    result = {"case": name, "dtype": str(dtype), "deterministic": deterministic,
                              "ok": False, "error": f"{type(error).__name__}: {error}"}  # fmt: skip
                results.append(result)
                errors = " ".join(f"{k}={v:.1e}" for k, v in result.get("rel_l2", {}).items())
                mode = "sorted" if deterministic else "atomic"
                status = "ok  " if result["ok"] else "FAIL"
                print(f"[check {status}] {name:36s} {result['dtype']:9s} {mode:6s} {errors} {result.get('error', '')}")
                sys.stdout.flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------
# 2. + 3. timing
# --------------------------------------------------------------------------------------


def time_ms(fn, grad_to_none=None) -> float:
    if torch.cuda.is_available():
        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
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


def measure(impl, inputs, grad_out, backward):
    hidden, down, up, indices, routing_weights = inputs
    leaves = [hidden, down, up, routing_weights]
    fn = IMPLEMENTATIONS[impl]
    if not backward:

        def forward():
            with torch.no_grad():
                fn(hidden, down, up, indices, routing_weights)

        return time_ms(forward)

    def forward_backward():
        fn(hidden, down, up, indices, routing_weights).backward(grad_out)

    return time_ms(forward_backward, grad_to_none=leaves)


MEASUREMENTS = [  # (implementation, with backward)
    ("triton", False), ("triton", True), ("triton_atomic", True),
    ("eager", False), ("eager", True), ("eager_bf16", False), ("eager_bf16", True),
]  # fmt: skip


def run_timings(device, copy_gbps, smoke, started):
    dtype = torch.bfloat16
    element = torch.finfo(dtype).bits // 8
    if smoke:
        grid = [(16, H, K, E) for H in (32,) for K in (4,) for E in (64,)]
    else:
        grid = [(8192, H, K, E) for H in (1024, 2048) for K in (16, 64) for E in (1 << 16, 1 << 20)]
    rows = []
    for T, H, K, E in grid:
        inputs = make_inputs(T, H, E, K, dtype, device, requires_grad=True, seed=1)
        grad_out = torch.randn(T, H, device=device, dtype=dtype)
        forward_bytes = T * K * H * 2 * element + 2 * T * H * element
        row = {"T": T, "H": H, "K": K, "E": E, "dtype": "bfloat16", "forward_bytes": forward_bytes}
        for impl, backward in MEASUREMENTS:
            key = f"{impl}_{'fwd_bwd' if backward else 'fwd'}_ms"
            if impl.startswith("eager") and time.perf_counter() - started > TIME_BUDGET_S:
                row[key] = None
                row[f"{key}_error"] = "skipped: time budget"
                continue
            try:
                row[key] = measure(impl, inputs, grad_out, backward)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                row[key] = None
                row[f"{key}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            for t in inputs:
                t.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fwd_ms = row["triton_fwd_ms"]
        if fwd_ms:
            row["triton_fwd_GBps"] = forward_bytes / (fwd_ms * 1e-3) / 1e9
            row["triton_fwd_pct_of_copy"] = 100 * row["triton_fwd_GBps"] / copy_gbps
        for baseline in ("eager", "eager_bf16"):
            for phase in ("fwd", "fwd_bwd"):
                mine, theirs = row.get(f"triton_{phase}_ms"), row.get(f"{baseline}_{phase}_ms")
                row[f"speedup_{phase}_vs_{baseline}"] = theirs / mine if mine and theirs else None
        rows.append(row)
        print(markdown_row(row))
        sys.stdout.flush()
        del inputs, grad_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


HEADER = (
    "| T | H | K | E | triton fwd ms | GB/s | % copy | eager fwd ms | speed-up | eager_bf16 fwd ms | speed-up "
    "| triton fwd+bwd ms | atomic fwd+bwd ms | eager fwd+bwd ms | speed-up | eager_bf16 fwd+bwd ms | speed-up |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(row) -> str:
    def f(key, spec=".3f", suffix=""):
        value = row.get(key)
        return "n/a" if value is None else f"{value:{spec}}{suffix}"

    return (
        f"| {row['T']} | {row['H']} | {row['K']} | {row['E']} | {f('triton_fwd_ms')} | {f('triton_fwd_GBps', '.0f')} "
        f"| {f('triton_fwd_pct_of_copy', '.0f', '%')} | {f('eager_fwd_ms')} | {f('speedup_fwd_vs_eager', '.1f', 'x')} "
        f"| {f('eager_bf16_fwd_ms')} | {f('speedup_fwd_vs_eager_bf16', '.1f', 'x')} | {f('triton_fwd_bwd_ms')} "
        f"| {f('triton_atomic_fwd_bwd_ms')} | {f('eager_fwd_bwd_ms')} | {f('speedup_fwd_bwd_vs_eager', '.1f', 'x')} "
        f"| {f('eager_bf16_fwd_bwd_ms')} | {f('speedup_fwd_bwd_vs_eager_bf16', '.1f', 'x')} |"
    )


def git_commit() -> str | None:
    for variable in ("GIT_COMMIT", "GITHUB_SHA"):
        if os.environ.get(variable):
            return os.environ[variable]
    try:
        root = Path(__file__).resolve().parent.parent
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder (or .json path) for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        gpu = torch.cuda.get_device_name(device)
    elif args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device, gpu = torch.device("cpu"), "cpu (Triton interpreter)"
    else:
        print("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    # The float32 reference must be true float32 (no TF32 in its matmuls).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    print(f"# flash_expert on {gpu}; torch {torch.__version__}, triton {triton.__version__}\n")
    checks = run_checks(device, args.smoke)
    checks_ok = all(c["ok"] for c in checks)
    print(f"\ncorrectness: {'all passed' if checks_ok else 'FAILURES'} ({time.perf_counter() - started:.0f} s)\n")

    copy_gbps, rows = None, []
    if not args.skip_timing:
        copy_gbps = copy_bandwidth_gbps(device, args.smoke)
        print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write)\n")
        print(HEADER)
        rows = run_timings(device, copy_gbps, args.smoke, started)

    report = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "checks_ok": checks_ok,
        "checks": checks,
        "copy_bandwidth_GBps": copy_gbps,
        "timing_note": "medians of triton.testing.do_bench; bfloat16; uniform torch.randint expert ids",
        "results": rows,
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    json_path = out if out.suffix == ".json" else out / "flash_expert_gpu.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    table = "\n".join([HEADER, *(markdown_row(r) for r in rows)])
    json_path.with_suffix(".md").write_text(f"flash_expert on {gpu}, copy {copy_gbps} GB/s\n\n{table}\n")
    print(f"\nwrote {json_path} ({report['wall_s']:.0f} s)")
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
