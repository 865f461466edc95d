"""``moeflux`` command line.

* ``moeflux bench``: every system side by side on a preset or custom shapes (see ``--help``).
* ``moeflux report RESULTS.json ... -o DIR``: PNG plots and a Markdown page from bench results.
* ``moeflux demo``: the first thing to run: correctness, then the headline figure.
* ``moeflux check``: correctness of each backend against the seed reference (exit 1 on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from moeflux.bench.shapes import (
    MODES, PRESETS, Preset, custom_layer, custom_shapes, layers, shapes_from_file, unknown_preset_message,
)  # fmt: skip

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Flags that describe one custom MoE layer, with their Shape field.
_CUSTOM_FLAGS = ("hidden", "expert_dim", "experts", "top_k")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="shapes to run (default: competition on a GPU, cpu-small otherwise); "
                             "`moeflux bench --list` shows them")  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: the preset's (fp16 for the competition, bf16 for models) on a GPU, "
                             "fp32 on the CPU")  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="folder for <command>-<preset>.json and .md")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeflux", description="moeflux benchmarks, reports and checks")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="time moeflux and its peers side by side",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _common(bench)
    bench.add_argument("--list", action="store_true", help="list presets, layers and systems, then exit")
    shapes = bench.add_argument_group("custom shapes (instead of --preset)")
    shapes.add_argument("--shapes", default=None, metavar="FILE", help="YAML or JSON list of shapes")
    shapes.add_argument("--hidden", type=int, help="H, model width")
    shapes.add_argument("--expert-dim", type=int, help="D, one expert's intermediate width")
    shapes.add_argument("--experts", type=int, help="E, routed experts")
    shapes.add_argument("--top-k", type=int, help="k, routed experts per token")
    shapes.add_argument("--shared", type=int, default=0, help="S, shared experts (width D each)")
    shapes.add_argument("--tokens", default="4096",
                        help="comma-separated token counts T (sweep presets use their own)")  # fmt: skip
    shapes.add_argument("--layer", default=None, choices=sorted(layers()),
                        help="layer of the decode and token-sweep presets (default: competition)")  # fmt: skip
    bench.add_argument("--mode", choices=MODES, default="forward", help="forward, or train (forward + backward)")
    bench.add_argument("--systems", "--backends", dest="systems", default=None,
                       help="comma-separated systems (default: every built-in one that runs here); "
                            "a user adapter is package.module:ClassName")  # fmt: skip
    bench.add_argument("--with-seed-reference", action="store_true",
                       help="time the seed reference on every shape, even where it is slow")  # fmt: skip
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    bench.add_argument("--repeat", type=int, default=20, help="timed calls per row")
    bench.add_argument("--cold-start", default="auto", metavar="SYSTEMS",
                       help="systems whose first call in a fresh process is timed, or none "
                            "(auto: moeflux's Triton path on a GPU, none on the CPU)")  # fmt: skip
    bench.add_argument("--serve", action="store_true", help="also replay a stream of mixed-size requests")
    bench.add_argument("--serve-requests", type=int, default=48, help="requests in the --serve stream")
    bench.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    bench.add_argument("--markdown", default=None, metavar="PATH", help="write the results as Markdown")

    report = commands.add_parser("report", help="PNG plots and a Markdown page from bench results")
    report.add_argument("results", nargs="+", help="moeflux bench --json files")
    report.add_argument("-o", "--output", default="report", help="folder for the plots and report.md")

    demo = commands.add_parser("demo", help="check correctness, then time the default preset: the headline")
    demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    demo.add_argument("--dtype", choices=sorted(_DTYPES), default=None)

    check = commands.add_parser("check", help="correctness of every backend against the seed reference")
    _common(check)
    check.add_argument("--backends", default=None, help="comma-separated (default: torch, plus triton on a GPU)")
    return parser


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SystemExit(unknown_preset_message(name))
    return PRESETS[name]


def _device(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device) if args.device else _default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to PyTorch here; drop --device to run on the CPU")
    return device


def _default_preset(args: argparse.Namespace, device: torch.device) -> str:
    if args.preset:
        return args.preset
    if device.type != "cuda":
        print("moeflux: no CUDA GPU found; running the cpu-small preset on the CPU (--preset picks another)",
              file=sys.stderr)  # fmt: skip
        return "cpu-small"
    return "competition"


def _bench_shapes(args: argparse.Namespace, device: torch.device):
    """``(label, shapes, GPU dtype)`` from the custom flags, a shapes file or a preset."""
    given = [flag for flag in _CUSTOM_FLAGS if getattr(args, flag) is not None]
    if args.layer and not (args.preset and _preset(args.preset).takes_layer):
        sweeps = ", ".join(preset.name for preset in PRESETS.values() if preset.takes_layer)
        raise SystemExit(f"--layer picks the layer of a sweep preset ({sweeps}); add --preset")
    if given:
        missing = [f"--{flag.replace('_', '-')}" for flag in _CUSTOM_FLAGS if getattr(args, flag) is None]
        if missing:
            raise SystemExit(
                f"a custom shape needs --hidden, --expert-dim, --experts and --top-k; missing {', '.join(missing)}"
            )
        sizes = {flag: getattr(args, flag) for flag in _CUSTOM_FLAGS}
        if args.preset and _preset(args.preset).takes_layer:  # a sweep at this custom layer
            return args.preset, _preset(args.preset).build(custom_layer(**sizes, shared=args.shared)), "bf16"
        try:
            tokens = [int(t) for t in args.tokens.split(",")]
        except ValueError:
            raise SystemExit(f"--tokens takes comma-separated integers, got {args.tokens!r}") from None
        shapes = custom_shapes(**sizes, shared=args.shared, tokens=tokens)
        return "custom", shapes, "bf16"
    if args.shapes:
        shapes = shapes_from_file(args.shapes)
        if not shapes:
            raise SystemExit(f"{args.shapes} lists no shapes")
        if len({shape.workload for shape in shapes}) != 1:
            raise SystemExit(f"{args.shapes} mixes workloads; give one workload per file")
        return os.path.splitext(os.path.basename(args.shapes))[0], shapes, "bf16"
    name = _default_preset(args, device)
    preset = _preset(name)
    return name, preset.shapes(args.layer), preset.gpu_dtype


def _list(device: torch.device) -> None:
    from moeflux.bench.systems import SYSTEMS, make_system

    print("presets (--preset):")
    for preset in PRESETS.values():
        print(f"  {preset.name:<24} {preset.description}")
    print("layers (--layer, for decode and token-sweep):")
    for name, layer in layers().items():
        print(f"  {name:<24} {layer.layer}")
    print(f"systems (--systems) on {device}:")
    for name in SYSTEMS:
        system = make_system(name)
        status = "ok" if system.available(device) else f"not here: {system.note}"
        print(f"  {name:<24} [{system.workload}] {system.description} ({status})")


def _bench(args: argparse.Namespace) -> int:
    from moeflux.bench.coldstart import measure_cold_start
    from moeflux.bench.serve import run_serve
    from moeflux.bench.suite import run_bench
    from moeflux.bench.systems import default_systems

    device = _device(args)
    if args.list:
        _list(device)
        return 0
    label, shapes, gpu_dtype = _bench_shapes(args, device)
    dtype = _DTYPES[args.dtype or (gpu_dtype if device.type == "cuda" else "fp32")]
    workload = shapes[0].workload
    systems = args.systems.split(",") if args.systems else default_systems(workload, device)
    results = run_bench(shapes, device, dtype, systems, mode=args.mode, warmup=args.warmup, repeat=args.repeat,
                        with_seed_reference=args.with_seed_reference, preset=label)  # fmt: skip
    timed = {row["system"] for row in results.rows if row["status"] == "ok"}
    if args.cold_start == "auto":
        triton_paths = [name for name in ("moeflux-triton", "flash-expert-triton") if name in timed]
        cold = triton_paths[:1] if device.type == "cuda" else []
    else:
        cold = [] if args.cold_start == "none" else args.cold_start.split(",")
    for system in cold:
        results.cold_start.append(measure_cold_start(system, shapes[0], device, dtype))
    if args.serve:
        if workload != "moe":
            raise SystemExit("--serve replays MoE requests; pick a MoE preset or shape")
        largest = max(shapes, key=lambda shape: shape.tokens)
        results.serve = run_serve(largest, systems, device, dtype, num_requests=args.serve_requests,
                                  max_tokens=largest.tokens)  # fmt: skip
    print(results.terminal())
    if args.json:
        results.save_json(args.json)
    if args.markdown:
        results.save_markdown(args.markdown)
    if args.out:
        results.save_json(os.path.join(args.out, f"bench-{label}.json"))
        results.save_markdown(os.path.join(args.out, f"bench-{label}.md"))
    # A moeflux path that fails is a bug worth a red exit code; a peer that fails is only noted.
    ours = ("moeflux-", "flash-expert-")
    failed = [row for row in results.rows if row["status"] == "error" and row["system"].startswith(ours)]
    for row in failed:
        print(f"moeflux bench: {row['system']} failed on {row['shape']}: {row['note']}", file=sys.stderr)
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from moeflux.bench.plots import draw_report
    from moeflux.bench.results import BenchResults
    from moeflux.bench.schema import validate

    documents = []
    for path in args.results:
        with open(path) as f:
            document = json.load(f)
        problems = validate(document)
        if problems:
            raise SystemExit(f"{path} is not a moeflux bench result:\n  " + "\n  ".join(problems[:10]))
        documents.append(document)
    paths = draw_report(documents, args.output)
    page = [BenchResults.from_dict(document).markdown() for document in documents]
    page.append("## Plots\n\n" + "".join(f"![{os.path.basename(p)}]({os.path.basename(p)})\n\n" for p in paths))
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write("\n".join(page))
    for path in [*paths, os.path.join(args.output, "report.md")]:
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moeflux.bench.suite import run_bench, run_check

    device = _device(args)
    name = _default_preset(argparse.Namespace(preset=None), device)
    preset = _preset(name)
    dtype = _DTYPES[args.dtype or (preset.gpu_dtype if device.type == "cuda" else "fp32")]
    backend = "triton" if device.type == "cuda" else "torch"
    check = run_check(preset.shapes(), device, dtype, [backend])
    passed = sum(row["passed"] for row in check.rows)
    print(f"correctness: moeflux-{backend} passes the competition's check (allclose to the seed reference, "
          f"rtol = atol = 1e-2) on {passed}/{len(check.rows)} shapes of {name}")  # fmt: skip
    results = run_bench(preset.shapes(), device, dtype, [f"moeflux-{backend}", "torch-grouped-mm"], warmup=2,
                        repeat=10, preset=name)  # fmt: skip
    print(results.headline_line())
    print("next: `moeflux bench` for every system and metric, `moeflux bench --list` for presets")
    return 0 if passed == len(check.rows) else 1


def _check(args: argparse.Namespace) -> int:
    from moeflux.bench.suite import run_check

    device = _device(args)
    name = args.preset or ("competition" if device.type == "cuda" else "cpu-small")
    preset = _preset(name)
    if preset.workload != "moe":
        raise SystemExit(f"moeflux check runs MoE presets; {name} is a {preset.workload} preset")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    default = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    backends = args.backends.split(",") if args.backends else default
    report = run_check(preset.shapes(), device, dtype, backends)
    print(report.markdown())
    if args.out:
        report.save(args.out, f"check-{name}")
    if not all(row["passed"] for row in report.rows):
        print("moeflux check: FAILED", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"bench": _bench, "report": _report, "demo": _demo, "check": _check}[args.command]
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
