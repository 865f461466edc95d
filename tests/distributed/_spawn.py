"""Run a function in ``W`` processes joined by a Gloo process group, with a deadline.

``run_ranks(worker, W, *args)`` calls ``worker(rank, W, *args)`` in each process (spawned, so
the workers live in an importable module: :mod:`tests.distributed._workers`). A failing rank
fails the call and the others are terminated; the error lists every rank that raised, first
to fail first (a rank whose peer died reports a lost connection, which is not the cause). A
hang ends at ``timeout`` (the group's own collective timeout is shorter still, so a rank stuck
waiting for a peer raises first).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def _entry(rank: int, world_size: int, folder: str, worker, args: tuple) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    initialised = False
    try:
        dist.init_process_group(
            "gloo", init_method="file://" + os.path.join(folder, "rendezvous"), rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )  # fmt: skip
        initialised = True
        worker(rank, world_size, *args)
    except BaseException:
        # Before tearing the group down: the peers fail as soon as it goes, and the parent then
        # terminates this process.
        Path(folder, f"rank{rank}.error").write_text(f"{time.time():.6f}\n{traceback.format_exc()}")
        raise
    finally:
        if initialised:
            dist.destroy_process_group()


def _rank_errors(folder: str) -> str:
    """Every rank's traceback, the earliest first."""
    reports = []
    for path in Path(folder).glob("rank*.error"):
        stamp, text = path.read_text().split("\n", 1)
        reports.append((float(stamp), path.stem, text))
    return "\n".join(f"--- {name} ---\n{text}" for _, name, text in sorted(reports))


def run_ranks(worker, world_size: int, *args, timeout: float = 120.0) -> None:
    """``worker(rank, world_size, *args)`` on ``world_size`` Gloo ranks; raises if any rank fails."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(
            _entry, args=(world_size, folder, worker, args), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks of {worker.__name__} still running after {timeout} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            time.sleep(0.5)  # let the other ranks write their errors
            raise AssertionError(f"{worker.__name__} failed on {world_size} ranks:\n{_rank_errors(folder)}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
