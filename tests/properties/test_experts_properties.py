"""Property-based tests of the experts (``moeflux.ops.experts``): the Triton forward
(``experts_triton``), the Triton autograd (``experts_autograd``: output and the gradients of
``x``, the routing weights, ``gate_up`` and ``down``) and the torch path (``experts_torch``),
all against a float64 autograd reference written here.

Drawn: T from 0, H and D from 1, E from 1 to 33 with experts no token picks, k from 1 to E,
repeated experts within a token, 0-2 shared experts, float32 / float16 / bfloat16, contiguous
or strided ``x``, any subset of inputs needing gradients, small or default launch configs.
Every internal ``torch.empty`` starts as NaN. Checked: no NaN anywhere (the inputs have
none), each result within a rounding bound of the reference, and experts without tokens get
exactly zero weight gradients on both paths.

Error bound: ``||actual - reference|| <= tol * scale`` where ``scale`` is the norm of the same
float64 computation on the absolute values of every input: the size of the terms summed, so
a result that cancels to nearly zero is not held to a relative bound it cannot meet, while a
wrong or missing term (an error of the size of the terms) still fails.
"""

from __future__ import annotations

import math
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import moeflux.ops.experts.autograd as experts_autograd_module
from moeflux.ops.experts.autograd import experts_autograd
from moeflux.ops.experts.naive import experts_torch
from moeflux.ops.experts.triton import experts_triton
from moeflux.ops.grouped_matmul import GroupedMatmulConfig
from moeflux.ops.grouped_matmul.weight_grad import WeightGradConfig
from tests.properties.support import (
    check_within, examples, float_dtypes, laid_out, layouts, poisoned_allocations, token_counts,
)

SMALL = GroupedMatmulConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2)
SMALL_WG = WeightGradConfig(block_k=16, block_n=16, block_m=16, num_warps=4, num_stages=2)
# Per dtype, relative to the terms' size. bfloat16: the interpreter truncates to bfloat16 and
# the Triton backward rounds pre-activations, h, dh and dpre once each.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 4e-2}
NAMES = ("out", "x", "expert_weights", "gate_up", "down")


def experts64(x, expert_ids, expert_weights, gate_up, down, num_routed):
    """``sum_j w[t, j] SwiGLU_{ids[t, j]}(x[t]) + sum_s SwiGLU_{E+s}(x[t])``, float64, expert by expert."""
    T, D = x.shape[0], down.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(down.shape[0]):
        if e < num_routed:
            token, slot = (expert_ids == e).nonzero(as_tuple=True)
            scale = expert_weights[token, slot]
        else:
            token, scale = torch.arange(T), torch.ones(T, dtype=torch.float64)
        pre = x[token] @ gate_up[e]
        y = (F.silu(pre[:, :D]) * pre[:, D:]) @ down[e]
        out = out.index_add(0, token, y * scale[:, None])
    return out


def results(fn, inputs, grad_out, needs_grad):
    """``[out, dx, d_expert_weights, d_gate_up, d_down]`` (None where no gradient is needed)."""
    x, expert_ids, expert_weights, gate_up, down, num_routed = inputs
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, expert_weights, gate_up, down), needs_grad)]
    out = fn(leaves[0], expert_ids, leaves[1], leaves[2], leaves[3], num_routed)
    if any(needs_grad):
        out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad if need else None for leaf, need in zip(leaves, needs_grad)]


@st.composite
def problems(draw):
    E = draw(st.one_of(st.integers(1, 8), st.just(33)))
    T, H, D = draw(token_counts), draw(st.integers(1, 24)), draw(st.integers(1, 20))
    k = draw(st.integers(1, min(E, 4)))
    S = draw(st.integers(0, 2))
    chosen = draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=E, unique=True))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    pool = torch.tensor(chosen)
    if k <= len(chosen) and draw(st.booleans()):  # distinct experts per token, as a router picks
        picks = [torch.randperm(len(chosen), generator=generator)[:k] for _ in range(T)]
        expert_ids = pool[torch.stack(picks)] if T else torch.zeros(0, k, dtype=torch.int64)
    else:
        expert_ids = pool[torch.randint(0, len(chosen), (T, k), generator=generator)]
    dtype = draw(float_dtypes)
    x = torch.randn(T, H, generator=generator).to(dtype)
    gate_up = (torch.randn(E + S, H, 2 * D, generator=generator) / math.sqrt(H)).to(dtype)
    down = (torch.randn(E + S, D, H, generator=generator) / math.sqrt(D)).to(dtype)
    expert_weights = torch.rand(T, k, generator=generator)
    grad_out = torch.randn(T, H, generator=generator)
    return (x, expert_ids, expert_weights, gate_up, down, E), grad_out, draw(layouts)


def reference(inputs, grad_out):
    """The float64 results, and the same on the absolute values of every input (the scale)."""
    x, expert_ids, expert_weights, gate_up, down, num_routed = inputs
    both = []
    for transform in (lambda t: t, torch.abs):
        leaves = [transform(t.detach().double()).requires_grad_() for t in (x, expert_weights, gate_up, down)]
        out = experts64(leaves[0], expert_ids, leaves[1], leaves[2], leaves[3], num_routed)
        grads = torch.autograd.grad(out, leaves, transform(grad_out.double()), allow_unused=True)
        both.append([out.detach()] + [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)])
    return both


@examples(40)
@given(problems(), st.lists(st.booleans(), min_size=4, max_size=4), st.booleans(), st.booleans())
def test_experts_match_float64(problem, needs_grad, small_configs, recompute):
    inputs, grad_out, layout = problem
    x, expert_ids, expert_weights, gate_up, down, E = inputs
    dtype = x.dtype
    inputs = (laid_out(x, layout), *inputs[1:])
    configs = dict(gemm_config=SMALL, weight_grad_config=SMALL_WG) if small_configs else {}
    forward_configs = dict(gate_up_config=SMALL, down_config=SMALL) if small_configs else {}

    # recompute: the backward in bands of 8 expert columns, so most draws of D make several.
    with poisoned_allocations(), mock.patch.object(experts_autograd_module, "RECOMPUTE_MIN_BAND", 8):
        if any(needs_grad):
            triton = results(lambda *a: experts_autograd(*a, recompute=recompute, **configs), inputs, grad_out,
                             needs_grad)  # fmt: skip
        else:
            triton = results(lambda *a: experts_triton(*a, **forward_configs), inputs, grad_out, needs_grad)
    torch_path = results(experts_torch, inputs, grad_out, needs_grad)
    expected, scale = reference(inputs, grad_out)

    for i, name in enumerate(NAMES):
        if triton[i] is None:
            continue
        want_dtype = torch.float32 if name == "expert_weights" else dtype
        assert triton[i].dtype == torch_path[i].dtype == want_dtype, name
        check_within(f"triton {name}", triton[i], expected[i], scale[i], TOLERANCE[dtype])
        check_within(f"torch {name}", torch_path[i], expected[i], scale[i], TOLERANCE[dtype])

    # Experts no token picked: exactly zero weight gradients, on both paths.
    unused = torch.ones(E + down.shape[0] - E, dtype=torch.bool)
    unused[expert_ids.flatten()] = False
    unused[E:] = x.shape[0] == 0  # the shared experts see every token
    for path in (triton, torch_path):
        for grad in path[3:]:
            if grad is not None:
                assert torch.equal(grad[unused], torch.zeros_like(grad[unused])), "an expert without tokens got a gradient"
