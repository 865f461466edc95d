"""Write a GPU's grouped-GEMM config table from the sweeps of several forward-benchmark runs.

    python3 benchmarks/gemm_table.py --gpu H100 RUN1/moe_forward_gpu.json RUN2/moe_forward_gpu.json

Each run's ``sweeps`` (``benchmarks/moe_forward_gpu.py``) times, per GEMM shape, the
heuristic config and a few candidates. Timings on a lent GPU move by a few percent between
runs, so a single run's winner is often noise. A config enters the table only if, in every
run, it beat the heuristic by at least ``--margin`` (3%): for each table key the config with
the best worst-run ratio ``ms / heuristic ms`` is kept when that ratio is at most
``1 - margin``. The GPU's entries in ``src/moeflux/data/gemm_configs.json`` are replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "src" / "moeflux" / "data" / "gemm_configs.json"


def table_entries(runs: list[dict], margin: float) -> dict[str, dict]:
    """``{key: entry}`` for the configs that beat the heuristic by ``margin`` in every run."""
    ratios: dict[str, dict[tuple, list[float]]] = {}
    shapes: dict[str, str] = {}
    for run in runs:
        for sweep in run["sweeps"]:
            for gemm in ("gate_up", "down"):
                found = sweep.get(gemm) or {}
                heuristic_ms = found.get("heuristic_ms")
                if not heuristic_ms or "key" not in found:
                    continue
                shapes[found["key"]] = sweep["shape"]
                for candidate in found["candidates"]:
                    if candidate["ms"] is not None:
                        config = tuple(candidate["config"].values())
                        ratios.setdefault(found["key"], {}).setdefault(config, []).append(candidate["ms"] / heuristic_ms)
    entries = {}
    for key, by_config in sorted(ratios.items()):
        in_every_run = [(max(r), config, r) for config, r in by_config.items() if len(r) == len(runs)]
        if not in_every_run:
            continue
        worst, config, per_run = min(in_every_run)
        if worst <= 1 - margin:
            entries[key] = {"config": list(config), "ratios": [round(r, 3) for r in per_run], "shape": shapes[key]}
    return entries


def format_table(table: dict) -> str:
    """The table's JSON with one line per entry."""
    lines = ["{", f'  "about": {json.dumps(table["about"])},', '  "gpus": {']
    gpus = list(table["gpus"].items())
    for i, (gpu, found) in enumerate(gpus):
        lines += [f"    {json.dumps(gpu)}: {{", f'      "source": {json.dumps(found["source"])},']
        entries = list(found["entries"].items())
        if entries:
            lines.append('      "entries": {')
            lines += [f"        {json.dumps(k)}: {json.dumps(v)}" + ("," if j < len(entries) - 1 else "")
                      for j, (k, v) in enumerate(entries)]  # fmt: skip
            lines.append("      }")
        else:
            lines.append('      "entries": {}')
        lines.append("    }" + ("," if i < len(gpus) - 1 else ""))
    return "\n".join([*lines, "  }", "}"]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="moe_forward_gpu.json files of runs with a sweep")
    parser.add_argument("--gpu", required=True, help="the table's GPU family: H100 or H200")
    parser.add_argument("--margin", type=float, default=0.03)
    parser.add_argument("--source", default=None, help="where the runs are committed (defaults to their paths)")
    args = parser.parse_args()
    runs = [json.loads(Path(path).read_text()) for path in args.runs]
    for path, run in zip(args.runs, runs):
        if args.gpu not in run["gpu"]:
            print(f"{path} ran on {run['gpu']}, not an {args.gpu}", file=sys.stderr)
            return 2
    table = json.loads(TABLE.read_text())
    source = args.source or ", ".join(args.runs)
    commits = ", ".join(sorted({str(run.get("git_commit")) for run in runs}))
    table["gpus"][args.gpu] = {"source": f"{source} ({len(runs)} runs; commits {commits})",
                               "entries": table_entries(runs, args.margin)}  # fmt: skip
    TABLE.write_text(format_table(table))
    print(f"{args.gpu}: {len(table['gpus'][args.gpu]['entries'])} entries written to {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
