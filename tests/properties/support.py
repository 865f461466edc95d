"""Helpers shared by the property-based tests: the Hypothesis profiles, example counts,
poisoned allocations, strided views, float64 comparisons.

Profiles (``HYPOTHESIS_PROFILE``, loaded on import):

* ``ci`` (default): derandomised, so every CI run draws the same examples; each test runs a
  fixed number of them (30 unless it asks for fewer with :func:`examples`).
* ``long``: random draws, ``LONG_FACTOR`` times the examples; run by hand::

      HYPOTHESIS_PROFILE=long python3 -m pytest tests/properties

A failure prints the smallest failing example and a ``@reproduce_failure`` blob to replay it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
LONG_FACTOR = 20
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=30 * LONG_FACTOR, **_COMMON)
settings.load_profile(PROFILE)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def examples(ci: int) -> settings:
    """``@settings`` running ``ci`` examples in the ``ci`` profile (``LONG_FACTOR`` times more
    in ``long``): the interpreter's cost differs a lot between primitives."""
    return settings(max_examples=ci * LONG_FACTOR if PROFILE == "long" else ci)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; 0 when both are zero."""
    actual, expected = actual.detach().double(), expected.detach().double()
    norm = expected.norm()
    if norm == 0:
        return 0.0 if actual.norm() == 0 else math.inf
    return float((actual - expected).norm() / norm)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Every ``torch.empty`` / ``torch.empty_like`` called from Python starts filled with NaN
    (floats) or ``-2**30`` (integers), so an element a kernel should write but does not shows
    up as a NaN or a wild index in the results. (PyTorch's own C++ allocations are untouched.)"""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() == 0 or tensor.device.type == "meta":
            return tensor
        if tensor.is_floating_point():
            return tensor.fill_(math.nan)
        if tensor.dtype in (torch.int32, torch.int64):
            return tensor.fill_(-(2**30))
        return tensor

    def poisoned_empty(*args, **kwargs):
        return poison(empty(*args, **kwargs))

    def poisoned_empty_like(*args, **kwargs):
        return poison(empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = poisoned_empty, poisoned_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


LAYOUTS = ("contiguous", "column-strided", "offset", "transposed")


def check_within(name, actual, expected, scale, tolerance: float) -> None:
    """``actual`` has ``expected``'s shape, no NaN (unwritten memory), and an error norm against
    the float64 ``expected`` at most ``tolerance`` times ``scale``'s norm (the magnitude the
    rounding works on, e.g. a product of absolute values)."""
    assert actual.shape == expected.shape, name
    assert not actual.isnan().any(), f"{name}: NaN (unwritten memory?)"
    error = float((actual.double() - expected).norm())
    bound = tolerance * float(scale.norm())
    assert error <= bound, f"{name}: error {error:.3e} above {bound:.3e}"


def laid_out(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of a copy of 2-D ``tensor`` (same values) in another memory layout:

    * ``contiguous``;
    * ``column-strided``: every other column of a twice-as-wide buffer (unit stride lost);
    * ``offset``: rows of a buffer two columns wider, starting one element in: an odd row
      stride and a data pointer off 16-byte alignment (odd H / D in real models);
    * ``transposed``: column-major (the transpose of a contiguous buffer).
    """
    rows, cols = tensor.shape
    if layout == "contiguous":
        return tensor.clone().contiguous()
    if layout == "column-strided":
        buffer = torch.full((rows, 2 * cols), math.nan, dtype=tensor.dtype, device=tensor.device)
        buffer[:, ::2] = tensor
        return buffer[:, ::2]
    if layout == "offset":
        buffer = torch.full((rows, cols + 2), math.nan, dtype=tensor.dtype, device=tensor.device)
        buffer[:, 1 : cols + 1] = tensor
        return buffer[:, 1 : cols + 1]
    if layout == "transposed":
        return tensor.t().contiguous().t()
    raise ValueError(layout)


layouts = st.sampled_from(LAYOUTS)
float_dtypes = st.sampled_from(FLOAT_DTYPES)
# Token counts: none, one, and small ragged counts.
token_counts = st.one_of(st.sampled_from([0, 1]), st.integers(2, 13))
# Widths: 1, odd, around the 16-wide blocks, and up to a few blocks.
widths = st.one_of(st.sampled_from([1, 15, 16, 17, 33]), st.integers(1, 40))
