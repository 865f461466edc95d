"""Bad input gets a clear error naming the problem, never a silent wrong answer."""

import pytest
import torch

import moeflux

CONFIG = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=2, num_shared_experts=1)


@pytest.fixture
def weights():
    return moeflux.MoEWeights.random(CONFIG)


def test_wrong_rank(weights):
    with pytest.raises(ValueError, match=r"\[T, H\] or \[B, S, H\]"):
        moeflux.moe(torch.randn(16), weights, top_k=2)
    with pytest.raises(ValueError, match=r"\[T, H\] or \[B, S, H\]"):
        moeflux.moe(torch.randn(1, 2, 3, 16), weights, top_k=2)


def test_hidden_size_mismatch(weights):
    with pytest.raises(ValueError, match="hidden size 15"):
        moeflux.moe(torch.randn(3, 15), weights, top_k=2)


def test_dtype_mismatch(weights):
    with pytest.raises(TypeError, match="float16 but the weights are torch.float32"):
        moeflux.moe(torch.randn(3, 16, dtype=torch.float16), weights, top_k=2)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        moeflux.moe(torch.ones(3, 16, dtype=torch.int64), weights, top_k=2)


def test_devices_differ(weights):
    meta = moeflux.MoEWeights(*(t.to("meta") for t in (weights.router, weights.gate_up, weights.down)))
    with pytest.raises(ValueError, match="is on cpu but the weights are on meta"):
        moeflux.moe(torch.randn(3, 16), meta, top_k=2)
    mixed = moeflux.MoEWeights(weights.router.to("meta"), weights.gate_up, weights.down)
    with pytest.raises(ValueError, match="different devices"):
        moeflux.moe(torch.randn(3, 16), mixed, top_k=2)


@pytest.mark.parametrize("top_k", [0, 5, -1, 2.0, True])
def test_top_k_out_of_range(weights, top_k):
    with pytest.raises(ValueError, match="top_k"):
        moeflux.moe(torch.randn(3, 16), weights, top_k=top_k)


def test_bad_config():
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="hidden_size"):
        moeflux.MoEConfig(hidden_size=0, expert_size=8, num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="num_shared_experts"):
        moeflux.MoEConfig(hidden_size=8, expert_size=8, num_experts=4, top_k=1, num_shared_experts=-1)


def test_unknown_backend_and_triton_without_gpu(weights, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        moeflux.moe(torch.randn(3, 16), weights, top_k=2, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        moeflux.moe(torch.randn(3, 16), weights, top_k=2, backend="triton")


def test_float64_is_torch_only(weights):
    w64 = moeflux.MoEWeights(*(t.double() for t in (weights.router, weights.gate_up, weights.down)))
    out, _ = moeflux.moe(torch.randn(3, 16, dtype=torch.float64), w64, top_k=2, backend="torch")
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        moeflux.moe(torch.randn(3, 16, dtype=torch.float64), w64, top_k=2, backend="triton")


def test_module_rejects_weights_of_another_config():
    other = moeflux.MoEWeights.random(moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=5, top_k=2))
    with pytest.raises(ValueError, match="do not match"):
        moeflux.MoE(CONFIG, other)
