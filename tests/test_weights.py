"""Packing the competition's per-expert weights into moeflux's layout."""

import pytest
import torch

import moeflux
from moeflux import gpumode


def _seed(E=4, S=2, H=16, D=8):
    return gpumode.generate_input(H, D, E, S, 2, 1, 5, seed=7, device="cpu")


def test_from_seed_weights_places_every_tensor():
    x, seed, cfg = _seed()
    config = moeflux.MoEConfig.from_seed_config(cfg)
    packed = moeflux.MoEWeights.from_seed_weights(seed, config)
    assert packed.gate_up.shape == (6, 16, 16) and packed.down.shape == (6, 8, 16)
    assert torch.equal(packed.gate_up[1, :, :8], seed["experts.1.0.weight"])
    assert torch.equal(packed.gate_up[1, :, 8:], seed["experts.1.1.weight"])
    assert torch.equal(packed.down[3], seed["experts.3.2.weight"])
    assert torch.equal(packed.gate_up[5, :, :8], seed["shared_experts.0.weight"][:, 8:])
    assert torch.equal(packed.down[4], seed["shared_experts.2.weight"][:8])
    for key, value in packed.to_seed_weights().items():
        assert torch.equal(value, seed[key]), key


def test_shared_expert_slices_sum_to_the_wide_expert():
    """SwiGLU is separable along D: S slices of width D equal one expert of width S*D."""
    x, seed, cfg = _seed(S=2)
    x = x.reshape(-1, 16).double()
    g, u, d = (seed[f"shared_experts.{i}.weight"].double() for i in range(3))
    wide = (torch.nn.functional.silu(x @ g) * (x @ u)) @ d
    packed = moeflux.MoEWeights.from_seed_weights(seed, moeflux.MoEConfig.from_seed_config(cfg))
    sliced = sum(
        (torch.nn.functional.silu(x @ packed.gate_up[e, :, :8].double()) * (x @ packed.gate_up[e, :, 8:].double()))
        @ packed.down[e].double()
        for e in (4, 5)
    )
    torch.testing.assert_close(sliced, wide)


def test_missing_and_misshaped_keys_are_named():
    _, seed, cfg = _seed()
    config = moeflux.MoEConfig.from_seed_config(cfg)
    missing = dict(seed)
    del missing["experts.2.1.weight"]
    with pytest.raises(KeyError, match="experts.2.1.weight"):
        moeflux.MoEWeights.from_seed_weights(missing, config)
    misshaped = dict(seed)
    misshaped["shared_experts.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shared_experts.2.weight"):
        moeflux.MoEWeights.from_seed_weights(misshaped, config)
    with pytest.raises(KeyError, match="n_experts_per_token"):
        moeflux.MoEConfig.from_seed_config({k: v for k, v in cfg.items() if k != "n_experts_per_token"})


def test_inconsistent_packed_weights_are_rejected():
    config = moeflux.MoEConfig(hidden_size=8, expert_size=4, num_experts=3, top_k=1)
    w = moeflux.MoEWeights.random(config)
    with pytest.raises(ValueError, match="inconsistent"):
        moeflux.MoEWeights(w.router, w.gate_up[:, :, :6], w.down).validate()
    with pytest.raises(TypeError, match="mixed dtypes"):
        moeflux.MoEWeights(w.router, w.gate_up.double(), w.down).validate()


def test_expert_bias_is_float32_zeros_when_the_router_asks_for_it():
    plain = moeflux.MoEConfig(hidden_size=8, expert_size=4, num_experts=3, top_k=1)
    assert moeflux.MoEWeights.random(plain, dtype=torch.bfloat16).expert_bias is None
    router = moeflux.RouterConfig(scoring="sigmoid", expert_bias=True)
    config = moeflux.MoEConfig(hidden_size=8, expert_size=4, num_experts=3, top_k=1, router=router)
    w = moeflux.MoEWeights.random(config, dtype=torch.bfloat16)
    assert w.expert_bias.dtype == torch.float32 and w.expert_bias.tolist() == [0.0, 0.0, 0.0]
    w.validate()
    seed = moeflux.MoEWeights.from_seed_weights(w.to_seed_weights(), config)
    assert seed.expert_bias.tolist() == [0.0, 0.0, 0.0]


def test_bad_expert_bias_is_rejected():
    config = moeflux.MoEConfig(hidden_size=8, expert_size=4, num_experts=3, top_k=1)
    w = moeflux.MoEWeights.random(config)
    with pytest.raises(ValueError, match=r"float32 \[E=3\], got torch.float32 \[4\]"):
        moeflux.MoEWeights(w.router, w.gate_up, w.down, torch.zeros(4)).validate()
    with pytest.raises(ValueError, match=r"float32 \[E=3\], got torch.float16 \[3\]"):
        moeflux.MoEWeights(w.router, w.gate_up, w.down, torch.zeros(3, dtype=torch.float16)).validate()
