"""Address tables of the experts' weights: built in place from the competition's per-expert dict
or from packed weights, and every bad key named."""

import re

import pytest
import torch

from moeflux import gpumode
from moeflux.config import MoEConfig
from moeflux.expert_tables import ExpertTables, seed_weight
from moeflux.weights import MoEWeights

H, D, E, S = 32, 16, 3, 2
HALF = torch.float16


def seed(S=S):
    _, weights, config = gpumode.generate_input(H, D, E, S, 2, 1, 4, seed=3, device="cpu")
    return weights, MoEConfig.from_seed_config(config)


def test_from_seed_weights_points_at_the_dict_tensors():
    weights, config = seed()
    experts = ExpertTables.from_seed_weights(weights, config, dtype=torch.float16, device="cpu")
    assert (experts.num_experts, experts.num_shared_experts, experts.hidden_size, experts.expert_size) == (E, S, H, D)
    assert (experts.dtype, experts.device) == (torch.float16, torch.device("cpu"))
    gate, up, down = (weights[f"shared_experts.{i}.weight"] for i in range(3))
    # Routed experts at their own tensors; shared slice s at column s*D of the shared gate and up
    # (rows D*S apart) and at row s*D of the shared down. Nothing is copied.
    def routed(j):
        return [weights[f"experts.{i}.{j}.weight"].data_ptr() for i in range(E)]

    assert experts.gate_up.addresses.tolist() == [
        routed(0) + [gate.data_ptr() + s * D * 2 for s in range(S)],
        routed(1) + [up.data_ptr() + s * D * 2 for s in range(S)],
    ]
    assert experts.gate_up.leading_strides.tolist() == [D] * E + [D * S] * S
    assert experts.down.addresses.tolist() == [routed(2) + [down.data_ptr() + s * D * H * 2 for s in range(S)]]
    assert experts.down.leading_strides.tolist() == [H] * (E + S)
    # The tables hold the tensors (or views of them) they point into.
    held = experts.gate_up.tensors + experts.down.tensors
    assert all(any(t is weights[key] or t._base is weights[key] for t in held) for key in weights if "experts" in key)


def test_from_weights_matches_the_packed_layout():
    weights, config = seed()
    packed = MoEWeights.from_seed_weights(weights, config)
    experts = ExpertTables.from_weights(packed)
    assert (experts.num_experts, experts.num_shared_experts, experts.hidden_size, experts.expert_size) == (E, S, H, D)
    expert_bytes = H * 2 * D * 2
    base = packed.gate_up.data_ptr()
    assert experts.gate_up.addresses.tolist() == [[base + e * expert_bytes for e in range(E + S)],
                                                  [base + e * expert_bytes + D * 2 for e in range(E + S)]]  # fmt: skip
    assert experts.gate_up.leading_strides.tolist() == [2 * D] * (E + S) and experts.gate_up.align == 16
    with pytest.raises(ValueError, match="num_routed"):
        ExpertTables.from_packed(packed.gate_up, packed.down, E + S + 1)
    with pytest.raises(ValueError, match="gate_up"):
        ExpertTables.from_packed(packed.gate_up[:, :, :D], packed.down, E)


def test_no_shared_expert_needs_no_shared_keys():
    weights, config = seed(S=0)
    for i in range(3):
        del weights[f"shared_experts.{i}.weight"]
    experts = ExpertTables.from_seed_weights(weights, config, dtype=torch.float16, device="cpu")
    assert experts.num_shared_experts == 0 and experts.gate_up.num_experts == E


@pytest.mark.parametrize(
    "key, bad, error, what",
    [
        ("experts.2.1.weight", None, KeyError, "missing"),
        ("experts.0.2.weight", torch.zeros(H, D, dtype=HALF), ValueError, "shape"),
        ("shared_experts.0.weight", torch.zeros(H, D, dtype=HALF), ValueError, "shape"),  # the shared width is D*S
        ("experts.1.0.weight", torch.zeros(H, D), TypeError, "float32"),
        ("experts.1.2.weight", torch.zeros(D, H, dtype=HALF, device="meta"), ValueError, "meta"),
        ("shared_experts.2.weight", torch.zeros(H, D * S, dtype=HALF).t(), ValueError, "contiguous"),
        ("experts.0.1.weight", [[0.0] * D] * H, TypeError, "torch.Tensor"),
        # gate and up of one expert are read with one leading stride
        ("experts.2.1.weight", torch.zeros(H, 2 * D, dtype=HALF)[:, :D], ValueError, "experts.2.0.weight"),
    ],
)  # fmt: skip
def test_bad_keys_are_named(key, bad, error, what):
    weights, config = seed()
    if bad is None:
        del weights[key]
    else:
        weights[key] = bad
    with pytest.raises(error, match=re.escape(key)) as info:
        ExpertTables.from_seed_weights(weights, config, dtype=HALF, device="cpu")
    assert what in str(info.value)


def test_seed_weight_accepts_a_row_strided_view():
    # Only the last dimension must be contiguous: a column block of a wider tensor is read in place.
    wide = torch.zeros(H, 3 * D, dtype=torch.float16)
    block = wide[:, D : 2 * D]
    assert seed_weight({"w": block}, "w", (H, D), dtype=HALF, device=torch.device("cpu")) is block
