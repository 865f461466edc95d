"""The competition's contract: inputs, reference, entry point.

``backend="triton"`` runs on the CPU through Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` when there is no GPU): the path that reads the weights in place.
"""

import math
import re

import pytest
import torch

from moeflux import gpumode
from moeflux.bench.shapes import competition_shapes
from moeflux.config import MoEConfig
from moeflux.layer import moe
from moeflux.weights import MoEWeights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_path(data, backend):
    """What custom_kernel computed before it read the weights in place: ``moe`` on packed weights."""
    x, weights, config = data
    moe_config = MoEConfig.from_seed_config(config)
    with torch.no_grad():
        out, aux = moe(x, MoEWeights.from_seed_weights(weights, moe_config), moe_config.top_k, backend=backend)
    return out, aux.as_dict()


def test_generate_input_draw_order_and_scaling():
    x, w, cfg = gpumode.generate_input(32, 16, 3, 2, 2, 2, 4, seed=11, device="cpu")
    assert cfg == {"d_hidden": 32, "d_expert": 16, "n_routed_experts": 3, "n_shared_experts": 2,
                   "n_experts_per_token": 2, "batch_size": 2, "seq_len": 4}  # fmt: skip
    # Replay the documented draw order by hand.
    gen = torch.Generator().manual_seed(11)

    def draw(*shape):
        return torch.randn(shape, dtype=torch.float16, generator=gen)

    assert torch.equal(x, draw(2, 4, 32))
    assert torch.equal(w["router.weight"], draw(3, 32) / math.sqrt(32))
    for i in range(3):
        assert torch.equal(w[f"experts.{i}.0.weight"], draw(32, 16) / math.sqrt(16))
        assert torch.equal(w[f"experts.{i}.1.weight"], draw(32, 16) / math.sqrt(16))
        assert torch.equal(w[f"experts.{i}.2.weight"], draw(16, 32) / math.sqrt(32))
    assert torch.equal(w["shared_experts.0.weight"], draw(32, 32) / math.sqrt(32))
    assert torch.equal(w["shared_experts.1.weight"], draw(32, 32) / math.sqrt(32))
    assert torch.equal(w["shared_experts.2.weight"], draw(32, 32) / math.sqrt(32))
    assert all(t.dtype == torch.float16 for t in [x, *w.values()])


@pytest.mark.parametrize("shape", competition_shapes("tests"), ids=lambda s: s.name)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_kernel_passes_the_competition_check_on_scaled_down_test_shapes(shape, backend):
    # The competition's test shapes with H and D scaled down; the harness's own rule.
    data = gpumode.generate_input(128, 64, shape.nroutedexperts, shape.nsharedexperts,
                                  shape.nexpertspertoken, 1, 64, shape.seed, device=DEVICE)  # fmt: skip
    x, w, cfg = data
    expected = gpumode.ref_kernel(data)
    out = gpumode.custom_kernel(data, backend=backend)
    assert out.shape == x.shape and out.dtype == torch.float16
    assert torch.allclose(out, expected, rtol=1e-2, atol=1e-2)
    # The Triton path reads the per-expert weights in place: the same output as on packed weights.
    assert torch.equal(out, packed_path(data, backend)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_kernel_returns_aux_and_handles_no_shared_expert(backend):
    data = gpumode.generate_input(32, 16, 4, 0, 2, 1, 8, seed=1, device=DEVICE)
    for i in range(3):
        del data[1][f"shared_experts.{i}.weight"]  # S = 0: the shared keys may be absent
    out, aux = gpumode.custom_kernel(data, return_aux=True, backend=backend)
    assert torch.allclose(out, gpumode.ref_kernel(data), rtol=1e-2, atol=1e-2)
    assert set(aux) == {"router_probs", "expert_ids", "expert_weights", "tokens_per_expert",
                        "load_balancing_loss", "router_z_loss", "sequence_balance_loss",
                        "dropped_per_expert"}  # fmt: skip
    assert aux["router_probs"].shape == (8, 4) and aux["router_probs"].dtype == torch.float32
    assert int(aux["tokens_per_expert"].sum()) == 16
    packed_out, packed_aux = packed_path(data, backend)
    assert torch.equal(out, packed_out)
    for key, value in packed_aux.items():
        assert torch.equal(aux[key], value), key


@pytest.mark.parametrize(
    "key, bad, error",
    [
        ("experts.1.1.weight", None, KeyError),  # missing
        ("router.weight", None, KeyError),
        ("experts.2.0.weight", torch.zeros(32, 8, dtype=torch.float16), ValueError),  # shape
        ("shared_experts.2.weight", torch.zeros(16, 32, dtype=torch.float16), ValueError),  # D*S = 32 rows
        ("experts.0.2.weight", torch.zeros(16, 32, dtype=torch.float32), TypeError),  # dtype
        ("router.weight", torch.zeros(4, 32, dtype=torch.bfloat16), TypeError),
        ("experts.3.0.weight", torch.zeros(16, 32, dtype=torch.float16).t(), ValueError),  # last dim strided
        ("experts.1.2.weight", torch.zeros(16, 32, dtype=torch.float16, device="meta"), ValueError),  # device
    ],
)  # fmt: skip
def test_custom_kernel_names_the_bad_key(key, bad, error):
    data = gpumode.generate_input(32, 16, 4, 2, 2, 1, 8, seed=2, device=DEVICE)
    weights = dict(data[1])
    if bad is None:
        del weights[key]
    else:
        weights[key] = bad.to(DEVICE) if bad.device.type != "meta" else bad
    with pytest.raises(error, match=re.escape(key)):
        gpumode.custom_kernel((data[0], weights, data[2]), backend="triton")
