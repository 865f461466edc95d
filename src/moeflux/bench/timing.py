"""Timing, memory and environment records shared by every benchmark, and the progress bar."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeat: int = 20) -> list[float]:
    """Per-call times in milliseconds: CUDA events on a GPU, ``perf_counter`` on the CPU.

    Each call is timed alone (the GPU drains between calls), the way a caller that waits
    for each result sees it."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def percentile(ordered: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of sorted values, linearly interpolated."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median, p5, p95 and p99 of per-call times (ms), their mean, and the coefficient of
    variation ``cv = stdev / mean``: the run-to-run spread (0.02 means calls vary by ~2%)."""
    ordered = sorted(times_ms)
    mean = statistics.fmean(ordered)
    return {
        "median_ms": statistics.median(ordered),
        "p5_ms": percentile(ordered, 0.05),
        "p95_ms": percentile(ordered, 0.95),
        "p99_ms": percentile(ordered, 0.99),
        "mean_ms": mean,
        "cv": statistics.stdev(ordered) / mean if len(ordered) > 1 and mean > 0 else 0.0,
        "repeats": len(ordered),
    }


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Device memory one call allocates on top of what was resident before it (inputs,
    weights, cached state), in MiB; ``None`` on the CPU, where PyTorch keeps no such count."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def environment(device: torch.device) -> dict[str, str]:
    """Where a result came from: device, software versions, date and commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        memory = f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB"
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        memory = "n/a"
    return {
        "device": device_name,
        "device_memory": memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    if os.environ.get("MOEFLUX_COMMIT"):
        return os.environ["MOEFLUX_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()  # fmt: skip
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Progress:
    """A live progress bar on stderr: rich's when installed, else tqdm's, else a plain
    one-line bar. When stderr is not a terminal (logs, CI) it prints one line per step."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.interactive = sys.stderr.isatty()
        self._bar = (self._rich() or self._tqdm()) if self.interactive else None

    def _rich(self):
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn
        except ImportError:
            return None
        bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           transient=False)  # fmt: skip
        bar.start()
        task = bar.add_task(self.label, total=self.total)
        return lambda what: bar.update(task, advance=1, description=f"{self.label} {what}"), bar.stop

    def _tqdm(self):
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        bar = tqdm(total=self.total, desc=self.label, file=sys.stderr, leave=True)

        def step(what: str) -> None:
            bar.set_postfix_str(what, refresh=False)
            bar.update(1)

        return step, bar.close

    def step(self, what: str) -> None:
        self.done += 1
        if self._bar is not None:
            advance, close = self._bar
            advance(what)
            if self.done >= self.total:
                close()
            return
        width = 24
        filled = width * self.done // max(self.total, 1)
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {what}"
        if self.interactive:
            sys.stderr.write("\r\033[K" + line + ("\n" if self.done == self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """End the bar early (a run that stopped before its last step)."""
        if self._bar is not None and self.done < self.total:
            self._bar[1]()
            self._bar = None
