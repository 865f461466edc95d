"""Cold start: how long the first call takes in a fresh process.

A fresh Python process (``sys.executable -m moeflux.bench.coldstart SPEC``) imports torch and
moeflux, builds the shape's inputs, prepares the system and times its first call (Triton
compiles its kernels here), then the median of a few steady calls. It runs twice with one new
``TRITON_CACHE_DIR``: first empty (a cold cache: every kernel compiles), then reusing what the
first run wrote (a warm cache: kernels load from disk). Both first calls also pay CUDA's and
cuBLAS's lazy initialisation, as any process does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

def _child(spec: dict) -> dict:
    import torch

    from moeflux.bench.cases import build_case
    from moeflux.bench.shapes import FlashExpertShape, Shape
    from moeflux.bench.systems import make_system
    from moeflux.bench.timing import summarize, synchronize, time_ms

    # From the parent's launch to here: interpreter start-up plus importing torch and moeflux.
    startup_s = time.time() - spec["launched_at"]
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    shape_class = FlashExpertShape if spec["workload"] == "flash-expert" else Shape
    case = build_case(shape_class(**spec["shape"]), device, dtype)
    system = make_system(spec["system"])
    system.prepare(case)
    synchronize(device)
    with torch.no_grad():
        begin = time.perf_counter()
        system()
        synchronize(device)
        first_call_ms = (time.perf_counter() - begin) * 1e3
        steady_ms = summarize(time_ms(system, device, warmup=1, repeat=5))["median_ms"]
    return {"startup_s": startup_s, "first_call_ms": first_call_ms, "steady_ms": steady_ms}


def measure_cold_start(system: str, shape, device, dtype, *, timeout_s: float = 300) -> dict:
    """First-call times of ``system`` on ``shape`` in two fresh processes (cold, then warm
    Triton cache). Returns the ``cold_start`` entry of a result file; ``note`` says what failed."""
    from dataclasses import asdict

    spec = {
        "system": system, "workload": shape.workload, "shape": asdict(shape), "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    entry = {"system": system, "shape": shape.name, "startup_s": None, "first_call_cold_ms": None,
             "first_call_warm_ms": None, "steady_ms": None, "note": ""}  # fmt: skip
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory(prefix="moeflux-triton-cache-") as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        # The child must import this same moeflux, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        for which in ("cold", "warm"):
            try:
                spec["launched_at"] = time.time()
                done = subprocess.run(
                    [sys.executable, "-m", "moeflux.bench.coldstart", json.dumps(spec)],
                    capture_output=True, text=True, timeout=timeout_s, env=env,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                entry["note"] = f"the {which}-cache run took over {timeout_s:.0f} s"
                break
            if done.returncode != 0:
                entry["note"] = f"the {which}-cache run failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
                break
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            entry[f"first_call_{which}_ms"] = measured["first_call_ms"]
            if which == "cold":
                entry["startup_s"] = measured["startup_s"]
            entry["steady_ms"] = measured["steady_ms"]
    return entry


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
