"""Result documents: what a run writes (JSON), prints (terminal table) and renders (Markdown).

:class:`BenchResults` is ``moeflux bench``'s document; its JSON layout is fixed by
:data:`moeflux.bench.schema.RESULT_SCHEMA`. :class:`Report` is ``moeflux check``'s simpler
table of rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from moeflux.bench.metrics import geomean
from moeflux.bench.schema import SCHEMA_ID

# What the baseline is called in the headline ("N× torch._grouped_mm").
_BASELINE_LABELS = {"torch-grouped-mm": "torch._grouped_mm", "seed-reference": "the seed reference",
                    "flash-expert-torch": "the torch path"}  # fmt: skip

# Markdown columns of a timed row: (key, header, format).
MARKDOWN_COLUMNS = [
    ("shape", "shape", "{}"), ("T", "T", "{}"), ("system", "system", "{}"),
    ("median_ms", "median ms", "{:.4g}"), ("p5_ms", "p5", "{:.4g}"), ("p95_ms", "p95", "{:.4g}"),
    ("p99_ms", "p99", "{:.4g}"), ("cv", "CV %", "pct"), ("tokens_per_s", "tokens/s", "{:.3g}"),
    ("tflops", "TFLOP/s", "{:.4g}"), ("pct_peak", "% peak", "{:.1f}"), ("gbps", "GB/s", "{:.4g}"),
    ("pct_copy_bw", "% copy BW", "{:.1f}"), ("pct_of_floor", "% of floor", "{:.1f}"),
    ("peak_mem_mb", "peak MiB", "{:.0f}"), ("max_abs_err", "max abs err", "{:.2e}"),
    ("rel_l2", "rel-L2", "{:.2e}"), ("speedup", "x baseline", "{:.2f}"), ("note", "note", "{}"),
]  # fmt: skip

# The terminal table keeps the columns a reader scans first.
TERMINAL_COLUMNS = ["shape", "system", "median_ms", "p95_ms", "tflops", "pct_peak", "speedup", "rel_l2", "peak_mem_mb"]


def _format(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "pct":
        return f"{100 * value:.1f}"
    return spec.format(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class BenchResults:
    """One ``moeflux bench`` run.

    Attributes:
        env: device, software versions, date, commit (:func:`moeflux.bench.timing.environment`).
        settings: preset, workload, dtype, mode, warm-up and repeat counts, timer, systems.
        calibration: the device ceilings measured in this run (:class:`~moeflux.bench.calibrate.DevicePeaks`).
        systems: each system's name, description, whether it ran here and why not.
        shapes: each shape's numbers, FLOPs, bytes, roofline floor and expert load.
        rows: one per (shape, system): ``status`` ``ok`` with the metrics of
            :mod:`moeflux.bench.metrics`, or ``skipped`` / ``error`` with a ``note``.
        cold_start: first-call times in fresh processes (:mod:`moeflux.bench.coldstart`).
        serve: per-system latencies of a replayed request stream (:mod:`moeflux.bench.serve`).
        headline: the one-line summary (:meth:`finish`).
    """

    env: dict
    settings: dict
    calibration: dict
    systems: list[dict] = field(default_factory=list)
    shapes: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    cold_start: list[dict] = field(default_factory=list)
    serve: list[dict] = field(default_factory=list)
    headline: dict | None = None

    def finish(self, baselines: list[str]) -> None:
        """Speed-up of every timed row against the first baseline timed on its shape, and
        the headline: moeflux's fastest path against that baseline, geometric means over shapes."""
        timed = {(row["shape"], row["system"]): row for row in self.rows if row["status"] == "ok"}
        baseline = next((name for name in baselines if any(s == name for _, s in timed)), None)
        self.settings["baseline"] = baseline
        for (shape, _), row in timed.items():
            base = timed.get((shape, baseline))
            row["speedup"] = base["median_ms"] / row["median_ms"] if base else None
        self.headline = self._headline(timed, baseline)

    def _headline(self, timed: dict, baseline: str | None) -> dict | None:
        ours = [name for name in self.settings["systems"] if name.startswith(("moeflux-", "flash-expert-"))]
        ours.sort(key=lambda name: not name.endswith("-triton"))  # the fast path first
        primary = next((name for name in ours if any(s == name for _, s in timed)), None)
        if primary is None:
            return None
        rows = [row for (_, system), row in timed.items() if system == primary]
        speedups = [row["speedup"] for row in rows if row.get("speedup")]
        tflops = geomean([row["tflops"] for row in rows])
        return {
            "system": primary,
            "baseline": baseline,
            "shapes": len(rows),
            "median_ms": geomean([row["median_ms"] for row in rows]),
            "tflops": tflops,
            "pct_peak": 100 * tflops / self.calibration["gemm_tflops"],
            "gbps": geomean([row["gbps"] for row in rows]),
            "pct_copy_bw": geomean([row["pct_copy_bw"] for row in rows]),
            "speedup": geomean(speedups) if speedups and primary != baseline else None,
        }

    def headline_line(self) -> str:
        """``moeflux-triton: 3.55 ms, 254 TFLOP/s, 35% of peak, 1.9x torch._grouped_mm (...)``."""
        h = self.headline
        if h is None:
            return "no moeflux system was timed"
        if self.settings["workload"] == "flash-expert":  # gathers rows: bound by memory, not by GEMMs
            line = f"{h['system']}: {h['median_ms']:.3g} ms, {h['gbps']:.4g} GB/s, {h['pct_copy_bw']:.0f}% of copy BW"
        else:
            line = f"{h['system']}: {h['median_ms']:.3g} ms, {h['tflops']:.3g} TFLOP/s, {h['pct_peak']:.0f}% of peak"
        if h["speedup"] is not None:
            line += f", {h['speedup']:.2f}x {_BASELINE_LABELS.get(h['baseline'], h['baseline'])}"
        shapes = f"geomean over {h['shapes']} shapes" if h["shapes"] > 1 else "1 shape"
        return line + f" ({shapes}, {self.env['device']}, {self.settings['dtype']})"

    def as_dict(self) -> dict:
        return {
            "schema": SCHEMA_ID, "kind": "moeflux bench", "env": self.env, "settings": self.settings,
            "calibration": self.calibration, "systems": self.systems, "shapes": self.shapes, "rows": self.rows,
            "cold_start": self.cold_start, "serve": self.serve, "headline": self.headline,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, document: dict) -> "BenchResults":
        keys = ("env", "settings", "calibration", "systems", "shapes", "rows", "cold_start", "serve", "headline")
        return cls(**{key: document[key] for key in keys})

    def save_json(self, path: str) -> None:
        _parent(path)
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=1)

    def save_markdown(self, path: str) -> None:
        _parent(path)
        with open(path, "w") as f:
            f.write(self.markdown())

    def markdown(self) -> str:
        env, settings, peaks = self.env, self.settings, self.calibration
        parts = [
            f"# moeflux bench: {settings['preset']} ({settings['workload']}, {settings['mode']})\n",
            f"{env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
            f"{env['date']} · commit {env['commit']}\n",
            f"{settings['dtype']}; {settings['warmup']} warm-up and {settings['repeat']} timed calls per row "
            f"({settings['timer']}). Ceilings measured in this run: dense GEMM {peaks['gemm_tflops']:.4g} TFLOP/s "
            f"({peaks['dtype']}, {peaks['gemm_size']}³ torch.mm), copy {peaks['copy_gbps']:.4g} GB/s. "
            f"Speed-ups against {settings.get('baseline') or '-'}.\n",
            f"**{self.headline_line()}**\n",
        ]
        timed = [row for row in self.rows if row["status"] == "ok"]
        if timed:
            parts.append(markdown_table(
                [header for _, header, _ in MARKDOWN_COLUMNS],
                [[_format(row.get(key), spec) for key, _, spec in MARKDOWN_COLUMNS] for row in timed],
            ))  # fmt: skip
        notes = self._not_timed()
        if notes:
            listed = [f"- {row['system']} on {row['shape']} ({row['status']}): {row['note']}\n" for row in notes]
            parts.append("Not timed:\n\n" + "".join(listed))
        if self.shapes:
            parts.append("## Expert load\n\n" + markdown_table(
                ["shape", "layer", "T", "active experts", "tokens/expert min / mean / max", "imbalance (max/mean)",
                 "FLOPs", "bytes", "roofline floor ms"],
                [[s["name"], s["layer"], str(s["tokens"]), str(s["active_experts"]),
                  f"{s['min_tokens_per_expert']} / {s['mean_tokens_per_expert']:.1f} / {s['max_tokens_per_expert']}",
                  f"{s['load_imbalance']:.2f}", f"{s['flops']:.3e}", f"{s['bytes']:.3e}", f"{s['floor_ms']:.4g}"]
                 for s in self.shapes],
            ))  # fmt: skip
        if self.cold_start:
            parts.append("## Cold start\n\nFirst call in a fresh process: Triton compile included with an empty "
                         "cache, the cache of the previous run reused with a warm one.\n\n" + markdown_table(
                ["system", "shape", "start-up s", "first call ms (cold cache)", "first call ms (warm cache)",
                 "steady ms"],
                [[c["system"], c["shape"], _format(c.get("startup_s"), "{:.2f}"),
                  _format(c.get("first_call_cold_ms"), "{:.4g}"), _format(c.get("first_call_warm_ms"), "{:.4g}"),
                  _format(c.get("steady_ms"), "{:.4g}")] for c in self.cold_start],
            ))  # fmt: skip
        if self.serve:
            parts.append("## Serving\n\nA stream of requests of mixed sizes, one at a time, as a serving engine "
                         "would issue them; latency per request.\n\n" + markdown_table(
                ["system", "layer", "requests", "tokens", "tokens/s", "p50 ms", "p95 ms", "p99 ms",
                 "decode p50 ms", "prefill p50 ms"],
                [[s["system"], s["layer"], str(s["requests"]), str(s["tokens"]), _format(s["tokens_per_s"], "{:.4g}"),
                  _format(s["p50_ms"], "{:.4g}"), _format(s["p95_ms"], "{:.4g}"), _format(s["p99_ms"], "{:.4g}"),
                  _format(s["decode_p50_ms"], "{:.4g}"), _format(s["prefill_p50_ms"], "{:.4g}")]
                 for s in self.serve],
            ))  # fmt: skip
        parts.append("## Systems\n\n" + "".join(
            f"- **{s['name']}**: {s['description']}" + ("" if s["available"] else f" — not run: {s['note']}") + "\n"
            for s in self.systems))  # fmt: skip
        return "\n".join(parts)

    def _not_timed(self) -> list[dict]:
        """Rows skipped or failed, less those of systems that do not run here at all (the
        systems list says why once)."""
        absent = {s["name"] for s in self.systems if not s["available"]}
        return [row for row in self.rows if row["status"] != "ok" and row["system"] not in absent]

    def terminal(self) -> str:
        """A compact fixed-width table of the timed rows and the headline, for the terminal."""
        columns = [(key, header, spec) for key, header, spec in MARKDOWN_COLUMNS if key in TERMINAL_COLUMNS]
        table = [[header for _, header, _ in columns]]
        table += [[_format(row.get(key), spec) for key, _, spec in columns]
                  for row in self.rows if row["status"] == "ok"]  # fmt: skip
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines += [f"not run here: {s['name']}: {s['note']}" for s in self.systems if not s["available"]]
        lines += [f"{row['status']}: {row['system']} on {row['shape']}: {row['note']}" for row in self._not_timed()]
        return "\n".join(lines) + "\n\n" + self.headline_line() + "\n"


@dataclass
class Report:
    """``moeflux check``'s result: a title, the environment and one row per (shape, backend)."""

    kind: str
    env: dict
    rows: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        env = self.env
        head = f"{self.kind} on {env['device']} (torch {env['torch']}, triton {env['triton']}), {env['date']}, commit {env['commit']}\n\n"
        if not self.rows:
            return head + "(no rows)\n"
        columns = list(self.rows[0].keys())
        return head + markdown_table(columns, [[_plain(row[c]) for c in columns] for row in self.rows])

    def save(self, out_dir: str, stem: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump({"kind": self.kind, "env": self.env, "rows": self.rows}, f, indent=1)
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(self.markdown())


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _parent(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
