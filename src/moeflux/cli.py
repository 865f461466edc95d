"""``moeflux`` command line: ``moeflux bench`` and ``moeflux check``."""

from __future__ import annotations

import argparse
import sys

import torch

from moeflux.bench.shapes import PRESETS

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="shapes to run (default: competition on a GPU, cpu-small otherwise)")  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: fp16 on a GPU (the competition's dtype), fp32 on the CPU")  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="folder for the JSON and Markdown results")


def _resolve(args: argparse.Namespace):
    device = torch.device(args.device) if args.device else _default_device()
    preset = args.preset or ("competition" if device.type == "cuda" else "cpu-small")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    return device, PRESETS[preset](), dtype, preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeflux", description="moeflux benchmarks and checks")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time the MoE layer against the seed reference")
    _common(bench)
    bench.add_argument("--systems", default=None, help="comma-separated, e.g. seed-reference,moeflux-torch")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--repeat", type=int, default=20)
    check = commands.add_parser("check", help="correctness of every backend against the seed reference")
    _common(check)
    check.add_argument("--backends", default=None, help="comma-separated (default: torch, plus triton on a GPU)")
    args = parser.parse_args(argv)

    from moeflux.bench.suite import run_bench, run_check, systems_for

    device, shapes, dtype, preset = _resolve(args)
    if args.command == "bench":
        systems = args.systems.split(",") if args.systems else systems_for(device)
        report = run_bench(shapes, device, dtype, systems, warmup=args.warmup, repeat=args.repeat)
        stem = f"bench-{preset}"
        failed = False
    else:
        default = ["torch", "triton"] if device.type == "cuda" else ["torch"]
        backends = args.backends.split(",") if args.backends else default
        report = run_check(shapes, device, dtype, backends)
        stem = f"check-{preset}"
        failed = not all(row["passed"] for row in report.rows)
    print(report.markdown())
    if args.out:
        report.save(args.out, stem)
    if failed:
        print("moeflux check: FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
