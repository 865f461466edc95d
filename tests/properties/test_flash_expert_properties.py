"""Property-based tests of ``moeflux.flash_expert``, forward and every gradient, on both
backends (Triton through the interpreter), against a float64 autograd reference written here.

Drawn: T from 0, H from 1 (odd, around the blocks), E from 1 to 300 with rows nobody picks,
K from 1 to 8 with repeated picks, float32 / float16 / bfloat16 with float32 or same-dtype
routing weights, int32 / int64 (and strided) indices, contiguous / column-strided /
misaligned inputs, deterministic (sorted) or atomic weight gradients, tiny or default tiles,
dots in token or expert order, any subset of inputs needing gradients. Every internal
``torch.empty`` starts as NaN. Checked: no NaN anywhere, each result within a rounding bound
of the reference (relative to the size of the terms, as in ``test_experts_properties``), and
pool rows nobody picked get exactly zero gradient.
"""

from __future__ import annotations

import math
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.flash_expert import triton as kernels
from tests.properties.support import (
    check_within, examples, float_dtypes, laid_out, poisoned_allocations, token_counts, widths,
)

TOLERANCE = {torch.float32: 2e-6, torch.float16: 5e-3, torch.bfloat16: 4e-2}
NAMES = ("out", "hidden", "down", "up", "routing_weights")


def flash64(hidden, down, up, indices, routing_weights):
    """``out[t] = sum_j w[t, j] silu(hidden[t] . down[idx[t, j]]) up[idx[t, j]]`` in float64."""
    scores = torch.einsum("th,tkh->tk", hidden, down[indices])
    return torch.einsum("tk,tkh->th", routing_weights * F.silu(scores), up[indices])


@st.composite
def problems(draw):
    E = draw(st.one_of(st.integers(1, 12), st.sampled_from([64, 100, 300])))
    T, H, K = draw(token_counts), draw(widths), draw(st.integers(1, 8))
    dtype = draw(float_dtypes)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    chosen = torch.tensor(draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=min(E, 16), unique=True)))
    indices = chosen[torch.randint(0, len(chosen), (T, K), generator=generator)]
    indices = indices.to(draw(st.sampled_from([torch.int64, torch.int32])))
    if draw(st.booleans()):  # column-major indices: flash_expert makes them contiguous
        indices = indices.t().contiguous().t()
    hidden = torch.randn(T, H, generator=generator).to(dtype)
    down = (torch.randn(E, H, generator=generator) / math.sqrt(H)).to(dtype)  # scores of order one
    up = torch.randn(E, H, generator=generator).to(dtype)
    routing_weights = torch.randn(T, K, generator=generator).to(draw(st.sampled_from([torch.float32, dtype])))
    grad_out = torch.randn(T, H, generator=generator)
    layouts = st.sampled_from(["contiguous", "column-strided", "offset"])
    hidden, down, up = (laid_out(t, draw(layouts)) for t in (hidden, down, up))
    return (hidden, down, up, indices, routing_weights), grad_out


def run(inputs, grad_out, needs_grad, **kwargs):
    """``[out, d_hidden, d_down, d_up, d_routing_weights]`` (None where not needed)."""
    hidden, down, up, indices, routing_weights = inputs
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((hidden, down, up, routing_weights), needs_grad)]
    out = flash_expert(leaves[0], leaves[1], leaves[2], indices, leaves[3], **kwargs)
    if any(needs_grad):
        out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad if need else None for leaf, need in zip(leaves, needs_grad)]


def reference(inputs, grad_out):
    """The float64 results, and the same on the absolute values of every input (the scale)."""
    hidden, down, up, indices, routing_weights = inputs
    both = []
    for transform in (lambda t: t, torch.abs):
        leaves = [transform(t.detach().double()).requires_grad_() for t in (hidden, down, up, routing_weights)]
        out = flash64(leaves[0], leaves[1], leaves[2], indices.long(), leaves[3])
        grads = torch.autograd.grad(out, leaves, transform(grad_out.double()), allow_unused=True)
        both.append([out.detach()] + [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)])
    return both


@examples(100)
@given(problems(), st.lists(st.booleans(), min_size=4, max_size=4), st.sampled_from(["torch", "triton"]),
       st.booleans(), st.booleans(), st.booleans())  # fmt: skip
def test_flash_expert_matches_float64(problem, needs_grad, backend, deterministic, tiny_tiles, sorted_dots):
    inputs, grad_out = problem
    hidden, down, up, indices, routing_weights = inputs
    dtype = hidden.dtype
    with mock.patch.object(kernels, "MAX_TILE_ELEMENTS", 64 if tiny_tiles else kernels.MAX_TILE_ELEMENTS):
        config = kernels.default_config(hidden.shape[1], indices.shape[1], dtype).replace(sorted_dots=sorted_dots)
        with poisoned_allocations():
            kwargs = dict(backend=backend)
            if backend == "triton":
                kwargs.update(deterministic=deterministic, config=config)
            actual = run(inputs, grad_out, needs_grad, **kwargs)
    expected, scale = reference(inputs, grad_out)
    wanted_dtypes = (dtype, dtype, down.dtype, up.dtype, routing_weights.dtype)
    for i, name in enumerate(NAMES):
        if actual[i] is not None:
            assert actual[i].dtype == wanted_dtypes[i], name
            check_within(f"{backend} {name}", actual[i], expected[i], scale[i], TOLERANCE[dtype])
    # Pool rows nobody picked: exactly zero gradient.
    unused = torch.ones(down.shape[0], dtype=torch.bool)
    unused[indices.flatten().long()] = False
    for grad in actual[2:4]:
        if grad is not None:
            assert torch.equal(grad[unused], torch.zeros_like(grad[unused])), "an unpicked row got a gradient"
