"""The Triton experts autograd against the autograd of :func:`moeflux.ops.experts.naive.experts_torch`.

Run on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1``, tiny shapes, 16-wide
blocks. Every gradient (``x``, ``expert_weights``, ``gate_up``, ``down``) and the output are
compared with the torch path's autograd on float32 copies of the same inputs: float32 must
agree to rounding (rel-L2 < 1e-5). Half precision must stay within a bound of float32 and
within a factor of the torch path's own error in that dtype; in bfloat16 the bound is wide
because Triton 3.6's interpreter truncates fp32 -> bfloat16 (the GPU rounds to nearest), and
the Triton path rounds pre-activations, h, dh and dpre to bfloat16 once each (measured on the
CPU: about 1.4e-2 against float32, 3x the torch path). A wrong gradient is off by O(1).
"""

from __future__ import annotations

import os

import pytest
import torch

import moeflux.ops.experts.autograd as experts_autograd_module
from moeflux.ops.dispatch import build_dispatch_plan
from moeflux.ops.experts.autograd import experts_autograd, grouped_matmul_autograd
from moeflux.ops.experts.naive import experts_torch
from moeflux.ops.grouped_matmul import GroupedMatmulConfig, grouped_matmul
from moeflux.ops.grouped_matmul.weight_grad import WeightGradConfig
from moeflux.ops.routing import route
from tests.ops.test_experts_triton import CASES, make_inputs, rel_l2

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
SMALL = GroupedMatmulConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2)
SMALL_WG = WeightGradConfig(block_k=16, block_n=16, block_m=16, num_warps=4, num_stages=2)
NAMES = ("out", "x", "expert_weights", "gate_up", "down")
TOLERANCE_VS_FP32 = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
# Allowed ratio to the torch path's error in the same dtype (its own rounding against float32).
RATIO_VS_TORCH = {torch.float16: 1.5, torch.bfloat16: 5.0}


def triton_small(*args):
    return experts_autograd(*args, gemm_config=SMALL, weight_grad_config=SMALL_WG)


def output_and_grads(experts, inputs, grad_out, dtype=None):
    """``(out, dx, d_expert_weights, d_gate_up, d_down)`` of ``experts`` on copies of ``inputs``
    (floating tensors cast to ``dtype`` when given; ``expert_weights`` stay float32)."""
    x, expert_ids, expert_weights, gate_up, down, num_routed = inputs
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = [cast(x).detach().clone(), expert_weights.detach().clone(), cast(gate_up).detach().clone(),
              cast(down).detach().clone()]  # fmt: skip
    for leaf in leaves:
        leaf.requires_grad_()
    out = experts(leaves[0], expert_ids, leaves[1], leaves[2], leaves[3], num_routed)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, H, D, E, S, k, choices", [c for c in CASES if c.id != "E256"])
def test_matches_torch_autograd(T, H, D, E, S, k, choices, dtype):
    # The forward test's cases: T=1 (most experts empty); H, D not multiples of 16 with an
    # unused expert and one shared slice; one expert takes all; k=E with two shared slices; E=1.
    inputs = make_inputs(T, H, D, E, S, k, dtype, choices=choices, seed=T + H + E)
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(T), device=DEVICE)
    triton = output_and_grads(triton_small, inputs, grad_out)
    exact = output_and_grads(experts_torch, inputs, grad_out, torch.float32)
    for name, actual, expected in zip(NAMES, triton, exact):
        assert actual.dtype == (torch.float32 if name == "expert_weights" else dtype), name
        assert actual.shape == expected.shape, name
        assert rel_l2(actual, expected) < TOLERANCE_VS_FP32[dtype], name
    if dtype != torch.float32:
        torch_path = output_and_grads(experts_torch, inputs, grad_out)
        for name, actual, own, expected in zip(NAMES, triton, torch_path, exact):
            # A floor of one unit in the last place: a few tiny dot products (T=1) can come out
            # near exact on the torch path by luck.
            floor = torch.finfo(dtype).eps
            assert rel_l2(actual, expected) <= RATIO_VS_TORCH[dtype] * max(rel_l2(own, expected), floor), name
    if choices is not None:  # experts no token chose: exact zero weight gradients
        unused = [e for e in range(E) if e not in choices]
        for grad in triton[3:]:
            assert torch.equal(grad[unused], torch.zeros_like(grad[unused]))


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_long_row_loops_down_gradient(recompute, monkeypatch):
    # 16-bit with at least WIDE_TILE_MIN_ROWS rows an expert (520 tokens on one routed expert
    # and the shared one, K and N ragged): d_down is computed as its transpose into the
    # gradient's transposed view. Against the float32 torch autograd, and against the other
    # orientation (the short row loops' path) on the same inputs.
    inputs = make_inputs(520, 24, 40, 1, 1, 1, torch.bfloat16, seed=12)
    grad_out = torch.randn(520, 24, generator=torch.Generator().manual_seed(12), device=DEVICE)
    transposed_outs = []
    real = experts_autograd_module.grouped_weight_grad

    def spy(a, b, plan, **kwargs):
        out = kwargs.get("out")
        transposed_outs.append(out is not None and out.stride(1) == 1 and out.stride(2) != 1)
        return real(a, b, plan, **kwargs)

    def triton(*args):
        return experts_autograd(*args, gemm_config=SMALL, weight_grad_config=SMALL_WG, recompute=recompute)

    monkeypatch.setattr(experts_autograd_module, "grouped_weight_grad", spy)
    monkeypatch.setattr(experts_autograd_module, "RECOMPUTE_MIN_BAND", 16)  # bands of D = 40
    long_rows = output_and_grads(triton, inputs, grad_out)
    assert any(transposed_outs)
    exact = output_and_grads(experts_torch, inputs, grad_out, torch.float32)
    for name, actual, expected in zip(NAMES, long_rows, exact):
        assert rel_l2(actual, expected) < TOLERANCE_VS_FP32[torch.bfloat16], name
    monkeypatch.setattr(experts_autograd_module, "long_row_loops", lambda dtype, rows: False)  # the other orientation
    transposed_outs.clear()
    other = output_and_grads(triton, inputs, grad_out)
    assert not any(transposed_outs)
    assert rel_l2(long_rows[4], other[4]) < 1e-2 and torch.equal(long_rows[3], other[3])


def test_partial_requires_grad_strided_and_expanded():
    # x a column slice of a wider tensor; a loss of out.sum() (grad_out expanded, stride 0);
    # only x and down need gradients (the other launches are skipped, the rest must still agree).
    x, expert_ids, expert_weights, gate_up, down, E = make_inputs(19, 40, 24, 5, 1, 2, torch.float32, seed=7)
    wide = torch.randn(19, 64, device=DEVICE)
    wide[:, 16:56] = x
    wide.requires_grad_()
    down_leaf = down.clone().requires_grad_()
    out = triton_small(wide[:, 16:56], expert_ids, expert_weights, gate_up, down_leaf, E)
    out.sum().backward()
    x_ref, down_ref = x.clone().requires_grad_(), down.clone().requires_grad_()
    experts_torch(x_ref, expert_ids, expert_weights, gate_up, down_ref, E).sum().backward()
    assert rel_l2(wide.grad[:, 16:56], x_ref.grad) < 1e-5 and rel_l2(down_leaf.grad, down_ref.grad) < 1e-5
    assert torch.equal(wide.grad[:, :16], torch.zeros_like(wide.grad[:, :16]))


def test_deterministic_and_default_configs():
    # select_config / select_weight_grad_config choices; two backward passes agree bitwise
    # (fixed-order sums, no atomics).
    inputs = make_inputs(13, 32, 16, 4, 1, 2, torch.bfloat16, seed=9)
    grad_out = torch.randn(13, 32, device=DEVICE)
    first = output_and_grads(experts_autograd, inputs, grad_out)
    second = output_and_grads(experts_autograd, inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    exact = output_and_grads(experts_torch, inputs, grad_out, torch.float32)
    assert all(rel_l2(a, b) < TOLERANCE_VS_FP32[torch.bfloat16] for a, b in zip(first, exact))


def test_router_gradient_connects():
    # logits -> Triton routing (its own autograd) -> experts autograd: the router weight's
    # gradient matches the torch routing + torch experts graph.
    x, _, _, gate_up, down, E = make_inputs(12, 32, 16, 4, 1, 2, torch.float32, seed=11)
    router = (torch.randn(E, 32, generator=torch.Generator().manual_seed(1)) / 6).to(DEVICE)
    grads = []
    for backend, experts in (("triton", triton_small), ("torch", experts_torch)):
        router_leaf = router.clone().requires_grad_()
        routing = route(x @ router_leaf.T, 2, backend=backend)
        out = experts(x, routing.expert_ids, routing.expert_weights, gate_up, down, E)
        (out * torch.linspace(-1, 1, 32, device=DEVICE)).sum().backward()
        grads.append(router_leaf.grad)
    assert rel_l2(grads[0], grads[1]) < 1e-5


def test_no_tokens():
    inputs = make_inputs(0, 32, 16, 4, 1, 2, torch.float32)
    out, d_x, d_weights, d_gate_up, d_down = output_and_grads(triton_small, inputs, torch.zeros(0, 32, device=DEVICE))
    assert out.shape == (0, 32) and d_x.shape == (0, 32) and d_weights.shape == (0, 2)
    assert torch.equal(d_gate_up, torch.zeros_like(d_gate_up)) and torch.equal(d_down, torch.zeros_like(d_down))


@pytest.mark.parametrize("gather, scatter", [(False, False), (True, False), (False, True), (True, True)])
def test_grouped_matmul_autograd(gather, scatter):
    # The public op without epilogue against autograd through the torch reference loop:
    # T=13, k=2 of E=4 (+1 shared) -> P=39 rows, K=40, N=24 (ragged tiles).
    generator = torch.Generator().manual_seed(4)
    expert_ids = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(13)]).to(DEVICE)
    plan = build_dispatch_plan(expert_ids, 4, num_shared_experts=1, block_m=16)
    x = torch.randn(13 if gather else plan.num_pairs, 40, generator=generator).to(DEVICE)
    weight = (torch.randn(5, 40, 24, generator=generator) / 6).to(DEVICE)
    grad_out = torch.randn(plan.num_pairs, 24, generator=generator).to(DEVICE)
    grads = []
    for run in (
        lambda a, w: grouped_matmul_autograd(a, w, plan, gather=gather, scatter=scatter, gemm_config=SMALL,
                                             weight_grad_config=SMALL_WG),  # fmt: skip
        lambda a, w: grouped_matmul(a, w, plan, gather=gather, scatter=scatter, backend="torch"),
    ):
        a, w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        run(a, w).backward(grad_out)
        grads.append((a.grad, w.grad))
    assert rel_l2(grads[0][0], grads[1][0]) < 1e-5 and rel_l2(grads[0][1], grads[1][1]) < 1e-5


def test_column_bands_cover_H():
    from moeflux.ops.experts.autograd import _column_bands

    for H, D in [(7168, 2048), (2048, 768), (4096, 14336), (1040, 8), (24, 8), (3000, 100)]:
        bands = _column_bands(H, D)
        assert bands[0][0] == 0 and bands[-1][1] == H
        assert all(last == first for (_, last), (first, _) in zip(bands, bands[1:]))
        assert all(0 < last - first <= max(2 * D, 1024, 256) for first, last in bands)
        assert all((last - first) % 256 == 0 for first, last in bands[:-1])
    assert len(_column_bands(7168, 2048)) == 2 and len(_column_bands(4096, 14336)) == 1


def test_dx_in_column_bands_matches_torch():
    # H = 1040 > max(2D, 1024): dx is made in two bands of columns (768 + 272).
    inputs = make_inputs(9, 1040, 8, 4, 1, 2, torch.float32, seed=5)
    grad_out = torch.randn(9, 1040, generator=torch.Generator().manual_seed(1), device=DEVICE)
    triton = output_and_grads(triton_small, inputs, grad_out)
    exact = output_and_grads(experts_torch, inputs, grad_out, torch.float32)
    for name, actual, expected in zip(NAMES, triton, exact):
        assert rel_l2(actual, expected) < TOLERANCE_VS_FP32[torch.float32], name


def test_second_backward_raises():
    # The backward overwrites its saved pre-activations with their gradient: a second
    # backward through the same graph must refuse rather than read them as pre-activations.
    x, expert_ids, expert_weights, gate_up, down, num_routed = make_inputs(5, 16, 8, 4, 0, 2, torch.float32, seed=2)
    x.requires_grad_()
    out = triton_small(x, expert_ids, expert_weights, gate_up, down, num_routed)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True is not supported"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, H, D, E, S, k, choices", [c for c in CASES if c.id in ("T1", "ragged-empty-shared1", "k=E-shared2")])
def test_recompute_matches_torch_autograd(T, H, D, E, S, k, choices, dtype, monkeypatch):
    # Nothing saved, the backward recomputes the pre-activations band by band over D: bands of
    # 16 columns here, so D = 24 makes two (16 + 8) and every gradient sums over both.
    monkeypatch.setattr(experts_autograd_module, "RECOMPUTE_MIN_BAND", 16)
    inputs = make_inputs(T, H, D, E, S, k, dtype, choices=choices, seed=T + H + E)
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(T), device=DEVICE)

    def recomputing(*args):
        return experts_autograd(*args, gemm_config=SMALL, weight_grad_config=SMALL_WG, recompute=True)

    triton = output_and_grads(recomputing, inputs, grad_out)
    exact = output_and_grads(experts_torch, inputs, grad_out, torch.float32)
    torch_path = output_and_grads(experts_torch, inputs, grad_out) if dtype != torch.float32 else None
    for i, (name, actual, expected) in enumerate(zip(NAMES, triton, exact)):
        assert actual.dtype == (torch.float32 if name == "expert_weights" else dtype), name
        assert rel_l2(actual, expected) < TOLERANCE_VS_FP32[dtype], name
        if torch_path is not None:
            floor = torch.finfo(dtype).eps
            assert rel_l2(actual, expected) <= RATIO_VS_TORCH[dtype] * max(rel_l2(torch_path[i], expected), floor), name
    if choices is not None:
        unused = [e for e in range(E) if e not in choices]
        for grad in triton[3:]:
            assert torch.equal(grad[unused], torch.zeros_like(grad[unused]))


def test_recompute_allows_a_second_backward():
    # With nothing saved to overwrite, retain_graph works: the second pass adds the same gradient.
    x, expert_ids, expert_weights, gate_up, down, num_routed = make_inputs(5, 16, 8, 4, 0, 2, torch.float32, seed=2)
    x.requires_grad_()
    out = experts_autograd(x, expert_ids, expert_weights, gate_up, down, num_routed, gemm_config=SMALL,
                           weight_grad_config=SMALL_WG, recompute=True)  # fmt: skip
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()
    assert torch.allclose(x.grad, 2 * first)


def test_expert_bands_cover_D(monkeypatch):
    bands = experts_autograd_module._expert_bands
    assert bands(14336) == [(i * 1792, (i + 1) * 1792) for i in range(8)]  # Mixtral: 8 bands
    assert bands(2048) == [(0, 1024), (1024, 2048)] and bands(768) == [(0, 768)]
    monkeypatch.setattr(experts_autograd_module, "RECOMPUTE_MIN_BAND", 16)
    assert bands(40) == [(0, 16), (16, 32), (32, 40)]
    assert bands(16) == [(0, 16)] and bands(0) == []
    assert len(bands(1000)) == 8
