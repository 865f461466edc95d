"""Backend selection: the one place that decides which implementation runs.

* ``"torch"``: plain PyTorch (CPU and GPU, any float dtype, autograd everywhere).
* ``"triton"``: moeflux's Triton kernels (routing, dispatch, grouped GEMMs, combine; forward
  and backward).
  Needs a CUDA device, or ``TRITON_INTERPRET=1`` on the CPU (how CI tests kernels).
* ``"auto"``: ``"triton"`` on CUDA tensors when Triton imports, else ``"torch"``.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user's ``backend`` choice to ``"torch"`` or ``"triton"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not interpreted:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run "
                "the kernels on the CPU through Triton's interpreter"
            )
    return backend

