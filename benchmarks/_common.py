"""Helpers shared by the GPU check-and-time scripts in this folder."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def time_ms(fn, *, quick: bool = False) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, a few plain
    repetitions on the CPU (smoke runs of the scripts)."""
    if torch.cuda.is_available():
        warmup, rep = (10, 40) if quick else (25, 100)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[1]


def capture(fn):
    """``(graph, static outputs)``: ``fn`` warmed up twice on a side stream, then captured in
    a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def graph_replay(fn):
    """The ``replay`` of ``fn`` captured by :func:`capture`: timing it measures the device's
    time for ``fn``'s launches without the host's cost of issuing them."""
    return capture(fn)[0].replay


def no_host_sync(fn) -> bool | None:
    """True if ``fn`` runs under ``set_sync_debug_mode("error")`` (any torch host sync raises)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)


def git_commit() -> str | None:
    """The commit measured: ``MOEFLUX_COMMIT`` / ``GIT_COMMIT`` when set (the GPU machine's
    copy of the tree has no ``.git``), else ``git rev-parse``."""
    for variable in ("MOEFLUX_COMMIT", "GIT_COMMIT"):
        if os.environ.get(variable):
            return os.environ[variable]
    try:
        root = Path(__file__).resolve().parent.parent
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(gpu: str) -> dict:
    """What every results JSON opens with: the GPU, the torch / triton / CUDA versions, the date
    (UTC) and the commit measured."""
    return {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
    }  # fmt: skip


def pick_device(smoke: bool) -> tuple[torch.device, str] | None:
    """``(device, its name)``: the GPU, or the CPU for ``--smoke`` under ``TRITON_INTERPRET=1``;
    ``None`` (after a message) when neither is possible. Turns TF32 off, so the float32
    references are true float32."""
    if torch.cuda.is_available():
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
    elif smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device, name = torch.device("cpu"), "cpu (Triton interpreter)"
    else:
        print("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return device, name


def report_path(out: str, default_name: str) -> Path:
    """``out`` itself when it names a ``.json`` file, else ``out/default_name``; its folder is created."""
    path = Path(out)
    path = path if path.suffix == ".json" else path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_report(json_path: Path, report: dict, markdown: str) -> None:
    """The JSON report and its Markdown summary side by side."""
    json_path.write_text(json.dumps(report, indent=2))
    json_path.with_suffix(".md").write_text(markdown)
