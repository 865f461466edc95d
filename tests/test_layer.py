"""The MoE layer (torch and Triton backends) against an independent float64 reference."""

import pytest
import torch

import moeflux
from tests.reference import moe64, rel_l2, softmax64

# (what it exercises, T, H, D, E, k, S)
SHAPES = [
    ("one token", 1, 32, 16, 4, 2, 1),
    ("k = 1", 9, 32, 16, 4, 1, 0),
    ("k = E", 7, 24, 16, 3, 3, 1),
    ("E = 1", 5, 16, 8, 1, 1, 0),
    ("H, D not multiples of 16", 13, 40, 24, 6, 2, 2),
    ("more experts than tokens: some get none", 3, 32, 16, 16, 2, 1),
    ("odd everything", 17, 33, 7, 5, 3, 2),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _backends():
    return ["torch", "triton"]


def _check_routing_is_top_k(aux: moeflux.MoEAux, probs64: torch.Tensor, dtype: torch.dtype) -> None:
    """The chosen experts must be a top-k set of the exact probabilities, up to the
    rounding of the dtype the layer ranks in."""
    slack = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    chosen = torch.zeros_like(probs64, dtype=torch.bool).scatter_(1, aux.expert_ids, True)
    assert (chosen.sum(1) == aux.expert_ids.shape[1]).all(), "an expert was chosen twice for one token"
    worst_chosen = probs64.masked_fill(~chosen, float("inf")).min(1).values
    best_unchosen = probs64.masked_fill(chosen, float("-inf")).max(1).values
    assert (worst_chosen >= best_unchosen - slack * probs64.max(1).values).all()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", SHAPES, ids=[s[0] for s in SHAPES])
def test_layer_matches_float64_reference(case, dtype, backend):
    _, T, H, D, E, k, S = case
    config = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=k, num_shared_experts=S)
    weights = moeflux.MoEWeights.random(config, dtype=dtype)
    x = torch.randn(T, H).to(dtype)

    out, aux = moeflux.moe(x, weights, top_k=k, backend=backend)

    assert out.shape == x.shape and out.dtype == dtype
    probs64 = softmax64(x.double() @ weights.router.double().T)
    _check_routing_is_top_k(aux, probs64, dtype)
    assert torch.allclose(aux.router_probs.double(), probs64, atol={torch.float32: 1e-6}.get(dtype, 1e-2))
    assert torch.allclose(aux.expert_weights.double(), probs64.gather(1, aux.expert_ids), atol=1e-2 if dtype != torch.float32 else 1e-6)
    assert torch.equal(aux.tokens_per_expert, torch.bincount(aux.expert_ids.flatten(), minlength=E))
    expected = moe64(x, weights.router, weights.gate_up, weights.down, aux.expert_ids, probs64.gather(1, aux.expert_ids), S)
    assert rel_l2(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", _backends())
def test_all_tokens_on_one_expert(backend):
    config = moeflux.MoEConfig(hidden_size=32, expert_size=16, num_experts=8, top_k=1, num_shared_experts=1)
    weights = moeflux.MoEWeights.random(config)
    with torch.no_grad():
        weights.router.zero_()
        weights.router[5] = 1.0  # every logit of expert 5 is sum(x): make x positive
    x = torch.rand(20, 32) + 0.1
    out, aux = moeflux.moe(x, weights, top_k=1, backend=backend)
    assert aux.tokens_per_expert.tolist() == [0, 0, 0, 0, 0, 20, 0, 0]
    assert (aux.expert_ids == 5).all()
    probs64 = softmax64(x.double() @ weights.router.double().T)
    expected = moe64(x, weights.router, weights.gate_up, weights.down, aux.expert_ids, probs64.gather(1, aux.expert_ids), 1)
    assert rel_l2(out, expected) < 1e-5


@pytest.mark.parametrize("backend", _backends())
def test_batched_input_and_normalized_weights(backend):
    config = moeflux.MoEConfig(hidden_size=32, expert_size=16, num_experts=6, top_k=3, normalize_topk=True)
    layer = moeflux.MoE(config, backend=backend)
    x = torch.randn(2, 5, 32)
    out, aux = layer(x)
    assert out.shape == (2, 5, 32)
    assert torch.allclose(aux.expert_weights.sum(-1), torch.ones(10), atol=1e-6)
    flat_out, _ = moeflux.moe(x.reshape(10, 32), layer.weights, top_k=3, normalize_topk=True, backend=backend)
    assert torch.allclose(out.reshape(10, 32), flat_out)
    probs64 = softmax64(x.reshape(10, 32).double() @ layer.router.double().T)
    chosen = probs64.gather(1, aux.expert_ids)
    expected = moe64(x.reshape(10, 32), layer.router, layer.gate_up, layer.down, aux.expert_ids, chosen / chosen.sum(1, keepdim=True), 0)
    assert rel_l2(out.reshape(10, 32), expected) < 1e-5


@pytest.mark.parametrize("backend", _backends())
def test_non_contiguous_input(backend):
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=2, num_shared_experts=1)
    weights = moeflux.MoEWeights.random(config)
    x = torch.randn(10, 32)[:, ::2]  # stride 2 along H
    out, _ = moeflux.moe(x, weights, top_k=2, backend=backend)
    expected, _ = moeflux.moe(x.contiguous(), weights, top_k=2, backend=backend)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", _backends())
def test_zero_tokens_gives_empty_output(backend):
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=2, num_shared_experts=1)
    weights = moeflux.MoEWeights.random(config)
    out, aux = moeflux.moe(torch.randn(0, 16), weights, top_k=2, backend=backend)
    assert out.shape == (0, 16)
    assert aux.router_probs.shape == (0, 4) and aux.expert_ids.shape == (0, 2)
    assert aux.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert aux.load_balancing_loss.item() == 0.0 and aux.router_z_loss.item() == 0.0


@pytest.mark.parametrize("backend", _backends())
def test_nan_input_stays_in_its_token(backend):
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=2)
    weights = moeflux.MoEWeights.random(config)
    x = torch.randn(6, 16)
    x[2, 3] = float("nan")
    out, aux = moeflux.moe(x, weights, top_k=2, backend=backend)
    assert torch.isnan(out[2]).all()
    assert not torch.isnan(out[[0, 1, 3, 4, 5]]).any()
    assert ((aux.expert_ids >= 0) & (aux.expert_ids < 4)).all()


def test_gradients_match_autograd_of_float64_reference():
    """Gradients of x, every weight and both aux losses, by finite differences in float64."""
    config = moeflux.MoEConfig(hidden_size=6, expert_size=4, num_experts=4, top_k=2, num_shared_experts=1)
    torch.manual_seed(3)
    weights = moeflux.MoEWeights.random(config, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    leaves = [x, weights.router.requires_grad_(), weights.gate_up.requires_grad_(), weights.down.requires_grad_()]

    def layer(x, router, gate_up, down):
        out, aux = moeflux.moe(x, moeflux.MoEWeights(router, gate_up, down), top_k=2, backend="torch")
        return out, aux.load_balancing_loss, aux.router_z_loss, aux.expert_weights

    assert torch.autograd.gradcheck(layer, leaves, eps=1e-6, atol=1e-5)


def test_triton_routing_gradients_match_torch_routing():
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=6, top_k=3, num_shared_experts=1)
    weights = moeflux.MoEWeights.random(config)
    x = torch.randn(11, 16)
    grads = {}
    for backend in ("torch", "triton"):
        router = weights.router.clone().requires_grad_()
        out, aux = moeflux.moe(x, moeflux.MoEWeights(router, weights.gate_up, weights.down), top_k=3, backend=backend)
        (out.square().sum() + aux.load_balancing_loss + 0.1 * aux.router_z_loss).backward()
        grads[backend] = router.grad
    assert rel_l2(grads["triton"], grads["torch"]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_layer_gradients_match_torch_layer(dtype):
    """Training on the Triton path: every gradient (x, router through the weights and both aux
    losses, routed and shared experts) against the torch path's autograd."""
    config = moeflux.MoEConfig(hidden_size=24, expert_size=16, num_experts=6, top_k=2, num_shared_experts=1)
    base = moeflux.MoEWeights.random(config, dtype=dtype)
    x0 = torch.randn(9, 24).to(dtype)
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [x0.clone().requires_grad_(), *(t.clone().requires_grad_() for t in (base.router, base.gate_up, base.down))]
        out, aux = moeflux.moe(leaves[0], moeflux.MoEWeights(*leaves[1:]), top_k=2, backend=backend)
        (out.float().square().sum() + aux.load_balancing_loss + 0.1 * aux.router_z_loss).backward()
        grads[backend] = [leaf.grad for leaf in leaves]
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for name, actual, expected in zip(("x", "router", "gate_up", "down"), grads["triton"], grads["torch"]):
        assert actual is not None and actual.dtype == dtype, name
        assert rel_l2(actual, expected) < tolerance, name
