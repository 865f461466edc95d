"""The Triton experts path against :func:`moeflux.ops.experts.naive.experts_torch`.

Run on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1``. float32 must agree to
rounding (rel-L2 < 1e-5); half precision is looser because the two paths round at different
places (the torch path rounds gate, up and silu(gate) * up to the input dtype, the kernel
keeps them in fp32), and Triton 3.6's interpreter truncates fp32 -> bfloat16 where the GPU
rounds to nearest, which about doubles the bfloat16 error on the CPU (measured: <= 1.5e-2
against the torch path, <= 1e-2 against float32).
"""

from __future__ import annotations

import os

import pytest
import torch

from moeflux.config import MoEConfig
from moeflux.expert_tables import ExpertTables
from moeflux.ops.experts.naive import experts_torch
from moeflux.ops.experts.triton import combine_pairs, experts_triton, experts_triton_tables
from moeflux.ops.grouped_matmul import GroupedMatmulConfig
from moeflux.weights import MoEWeights

# Triton 3.6's interpreter turns a runtime loop bound into a 1-element array (NumPy 1.25+ warns).
# tests/conftest.py switches the interpreter on when there is no GPU; it runs on CPU tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
SMALL = GroupedMatmulConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2)
# rel-L2 bounds: against the torch path in the same dtype, and against the float32 evaluation
# of the same (rounded) inputs, which the kernel, rounding less often, should track closer.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TOLERANCE_VS_FP32 = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def make_inputs(T, H, D, E, S, k, dtype, *, choices=None, seed=0):
    """Layer weights in the packed layout, ``x``, and softmax-weighted distinct expert choices
    drawn from ``choices`` (default: all ``E`` experts)."""
    generator = torch.Generator().manual_seed(seed)
    config = MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=k, num_shared_experts=S)
    weights = MoEWeights.random(config, generator=generator)
    pool = torch.tensor(choices if choices is not None else list(range(E)))
    picks = [torch.randperm(len(pool), generator=generator)[:k] for _ in range(T)]
    expert_ids = pool[torch.stack(picks)] if T > 0 else torch.zeros(0, k, dtype=torch.int64)
    expert_weights = torch.softmax(torch.randn(T, k, generator=generator), dim=-1)
    x = torch.randn(T, H, generator=generator)
    to = dict(device=DEVICE, dtype=dtype)
    return (x.to(**to), expert_ids.to(DEVICE), expert_weights.to(DEVICE),
            weights.gate_up.to(**to), weights.down.to(**to), E)  # fmt: skip


CASES = [
    # (T, H, D, E, S, k, expert choices): what it exercises
    pytest.param(1, 32, 16, 4, 0, 2, None, id="T1"),  # one token: most experts empty
    # H, D not multiples of 16 (ragged K and N tails in both GEMMs); expert 3 unused
    pytest.param(24, 40, 24, 6, 1, 2, [0, 1, 2, 4, 5], id="ragged-empty-shared1"),
    pytest.param(20, 32, 16, 4, 0, 1, [2], id="one-expert-takes-all"),  # two full tiles + a tail on expert 2
    pytest.param(9, 32, 16, 3, 2, 3, None, id="k=E-shared2"),  # every expert for every token, two shared slices
    pytest.param(10, 32, 16, 1, 0, 1, None, id="E1"),  # a single expert: a dense SwiGLU
    pytest.param(32, 16, 16, 256, 0, 4, None, id="E256"),  # 128 pairs over 256 experts, most empty
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, H, D, E, S, k, choices", CASES)
def test_matches_torch(T, H, D, E, S, k, choices, dtype):
    inputs = make_inputs(T, H, D, E, S, k, dtype, choices=choices, seed=T + H + E)
    out = experts_triton(*inputs, gate_up_config=SMALL, down_config=SMALL)
    expected = experts_torch(*inputs)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_l2(out, expected) < TOLERANCE[dtype]
    if dtype != torch.float32:
        x, expert_ids, expert_weights, gate_up, down, num_routed = inputs
        exact = experts_torch(x.float(), expert_ids, expert_weights, gate_up.float(), down.float(), num_routed)
        assert rel_l2(out, exact) < TOLERANCE_VS_FP32[dtype]


def test_no_tokens():
    inputs = make_inputs(0, 32, 16, 4, 1, 2, torch.float32)
    out = experts_triton(*inputs, gate_up_config=SMALL, down_config=SMALL)
    assert out.shape == (0, 32)


def test_default_configs_and_strided_input():
    # select_config's own choices; x a column slice of a wider tensor; int32 ids; a block_m
    # that differs between the two GEMMs (the down GEMM re-tiles the plan).
    x, expert_ids, expert_weights, gate_up, down, E = make_inputs(19, 48, 24, 5, 1, 2, torch.float32, seed=7)
    wide = torch.randn(19, 64, device=DEVICE)
    wide[:, 16:] = x
    strided = wide[:, 16:]
    expected = experts_torch(x, expert_ids, expert_weights, gate_up, down, E)
    out = experts_triton(strided, expert_ids.int(), expert_weights, gate_up, down, E)
    assert rel_l2(out, expected) < TOLERANCE[torch.float32]
    other_block_m = GroupedMatmulConfig(block_m=32, block_n=16, block_k=16, group_m=4, num_warps=4, num_stages=2)
    out = experts_triton(strided, expert_ids, expert_weights, gate_up, down, E, gate_up_config=SMALL,
                         down_config=other_block_m)  # fmt: skip
    assert rel_l2(out, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_separate_per_expert_weights_match_the_packed_path(dtype):
    # The competition's layout (a tensor per expert and projection, a shared expert of width
    # D*S = 2D) read in place gives the packed layout's output bit for bit.
    x, expert_ids, expert_weights, gate_up, down, E = make_inputs(11, 32, 16, 4, 2, 2, dtype, seed=9)
    config = MoEConfig(hidden_size=32, expert_size=16, num_experts=E, top_k=2, num_shared_experts=2)
    seed_weights = MoEWeights(torch.zeros(E, 32, device=DEVICE, dtype=dtype), gate_up, down).to_seed_weights()
    experts = ExpertTables.from_seed_weights(seed_weights, config, dtype=dtype, device=DEVICE)
    out = experts_triton_tables(x, expert_ids, expert_weights, experts, gate_up_config=SMALL, down_config=SMALL)
    packed = experts_triton(x, expert_ids, expert_weights, gate_up, down, E, gate_up_config=SMALL, down_config=SMALL)
    assert torch.equal(out, packed)


def test_combine_sums_slots_in_order():
    # out[t] = ((p[t, 0] + p[t, 1]) + p[t, 2]) + ... in fp32, rounded once: bitwise reproducible.
    # T=37 and H=1030 leave ragged tails in both block dimensions.
    generator = torch.Generator().manual_seed(8)
    pair_out = torch.randn(37, 5, 1030, generator=generator).to(DEVICE, torch.float16)
    expected = pair_out[:, 0].float()
    for j in range(1, 5):
        expected = expected + pair_out[:, j].float()
    out = combine_pairs(pair_out)
    assert out.dtype == torch.float16 and torch.equal(out, expected.to(torch.float16))
    assert torch.equal(combine_pairs(pair_out), out)


def test_rejects_mismatched_shapes():
    x, expert_ids, expert_weights, gate_up, down, E = make_inputs(4, 32, 16, 4, 0, 2, torch.float32)
    with pytest.raises(ValueError):
        experts_triton(x, expert_ids[:3], expert_weights, gate_up, down, E)
    with pytest.raises(ValueError):
        experts_triton(x, expert_ids, expert_weights, gate_up, down, 5)  # more routed experts than weights
