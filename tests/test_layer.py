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
    config = moeflux.MoEConfig(hidden_size=32, expert_size=16, num_experts=6, top_k=3,
                               router=moeflux.RouterConfig(normalize_topk=True))
    layer = moeflux.MoE(config, backend=backend)
    x = torch.randn(2, 5, 32)
    out, aux = layer(x)
    assert out.shape == (2, 5, 32)
    assert torch.allclose(aux.expert_weights.sum(-1), torch.ones(10), atol=1e-6)
    flat_out, _ = moeflux.moe(x.reshape(10, 32), layer.weights, top_k=3, router=config.router, backend=backend)
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


def test_recompute_layer_gives_the_same_gradients():
    """``MoE(recompute=True)`` saves no pre-activations and recomputes them in the backward:
    same forward, same gradients (to float32 rounding) as the default layer."""
    config = moeflux.MoEConfig(hidden_size=24, expert_size=16, num_experts=6, top_k=2, num_shared_experts=1)
    grads, outs = {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = moeflux.MoE(config, backend="triton", recompute=recompute)
        x = torch.randn(9, 24, requires_grad=True)
        out, aux = layer(x)
        (out.square().sum() + aux.load_balancing_loss).backward()
        outs[recompute] = out.detach()
        grads[recompute] = [x.grad, *(p.grad for p in layer.parameters())]
    assert "recompute=True" in repr(layer)
    assert rel_l2(outs[True], outs[False]) < 1e-6
    for actual, expected in zip(grads[True], grads[False]):
        assert rel_l2(actual, expected) < 1e-5


# ---- routing variants through the layer ------------------------------------------------------

# (what it exercises, E, k, router)
ROUTERS = [
    ("mixtral: renormalised softmax", 6, 2, moeflux.RouterConfig(normalize_topk=True)),
    ("gpt-oss: softmax after top-k", 6, 3, moeflux.RouterConfig(softmax_after_topk=True)),
    ("deepseek-v3: sigmoid, bias, groups, scaled", 8, 3, moeflux.RouterConfig(
        scoring="sigmoid", expert_bias=True, num_groups=4, topk_groups=2, normalize_topk=True, scaling_factor=2.5)),
    ("capacity: factor 0.5 drops pairs", 4, 2, moeflux.RouterConfig(capacity_factor=0.5)),
]


def _expected_weights(logits64, bias, k, router):
    """The chosen experts and weights, in float64, from each model's formula."""
    if router.softmax_after_topk:  # gpt-oss
        values, ids = logits64.topk(k, -1)
        return ids, torch.softmax(values, -1)
    if router.scoring == "sigmoid":  # DeepSeek-V3
        scores = logits64.sigmoid()
        choice = scores + bias.double()
        T, E, G = *choice.shape, router.num_groups
        group_scores = choice.view(T, G, E // G).topk(2, -1).values.sum(-1)
        keep = torch.zeros(T, G, dtype=torch.bool).scatter_(1, group_scores.topk(router.topk_groups, -1).indices, True)
        ids = choice.masked_fill(~keep.repeat_interleave(E // G, 1), float("-inf")).topk(k, -1).indices
        weights = scores.gather(1, ids)
        return ids, router.scaling_factor * weights / weights.sum(-1, keepdim=True)
    weights, ids = softmax64(logits64).topk(k, -1)
    return ids, weights / weights.sum(-1, keepdim=True) if router.normalize_topk else weights


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ROUTERS, ids=[c[0] for c in ROUTERS])
def test_router_variants_match_float64_reference(case, backend):
    _, E, k, router = case
    config = moeflux.MoEConfig(hidden_size=24, expert_size=16, num_experts=E, top_k=k, num_shared_experts=1,
                               router=router)  # fmt: skip
    torch.manual_seed(0)
    layer = moeflux.MoE(config, backend=backend)
    if router.expert_bias:
        layer.expert_bias.copy_(0.2 * torch.randn(E))
    x = torch.randn(2, 7, 24)
    out, aux = layer(x)
    tokens = x.reshape(14, 24)
    ids, weights = _expected_weights(tokens.double() @ layer.router.double().T, layer.expert_bias, k, router)
    assert torch.equal(aux.expert_ids, ids)
    capacity = router.capacity(14, E, k)
    if capacity is not None:
        kept = torch.zeros_like(ids, dtype=torch.bool)
        for e in range(E):  # an expert keeps its first `capacity` pairs, token by token
            rows, cols = (ids == e).nonzero(as_tuple=True)
            kept[rows[:capacity], cols[:capacity]] = True
        weights = torch.where(kept, weights, 0.0)
        assert torch.equal(aux.dropped_per_expert, torch.bincount(ids[~kept], minlength=E))
        assert int(aux.dropped_per_expert.sum()) > 0
    torch.testing.assert_close(aux.expert_weights.double(), weights, rtol=1e-5, atol=1e-7)
    expected = moe64(tokens, layer.router, layer.gate_up, layer.down, ids, weights, 1)
    assert rel_l2(out.reshape(14, 24), expected) < 1e-5


@pytest.mark.parametrize("case", ROUTERS, ids=[c[0] for c in ROUTERS])
def test_triton_router_gradients_match_torch_for_each_variant(case):
    """The router weight's gradient through the Triton routing (output, every aux loss) against the torch path."""
    _, E, k, router = case
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=E, top_k=k, num_shared_experts=1,
                               router=router)  # fmt: skip
    weights = moeflux.MoEWeights.random(config, generator=torch.Generator().manual_seed(2))
    if router.expert_bias:
        weights.expert_bias.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 4, 16)
    grads = {}
    for backend in ("torch", "triton"):
        leaf = weights.router.clone().requires_grad_()
        packed = moeflux.MoEWeights(leaf, weights.gate_up, weights.down, weights.expert_bias)
        out, aux = moeflux.moe(x, packed, k, router=router, backend=backend)
        loss = out.square().sum() + aux.load_balancing_loss + aux.sequence_balance_loss + 0.1 * aux.router_z_loss
        loss.backward()
        grads[backend] = leaf.grad
    assert grads["torch"].abs().sum() > 0
    assert rel_l2(grads["triton"], grads["torch"]) < 1e-5


def test_deepseek_layer_gradients_by_finite_differences():
    """Every gradient of a DeepSeek-V3-routed layer (and its aux losses) in float64."""
    router = moeflux.RouterConfig(scoring="sigmoid", expert_bias=True, num_groups=2, topk_groups=1,
                                  normalize_topk=True, scaling_factor=2.5)  # fmt: skip
    config = moeflux.MoEConfig(hidden_size=6, expert_size=4, num_experts=4, top_k=2, num_shared_experts=1, router=router)
    torch.manual_seed(4)
    weights = moeflux.MoEWeights.random(config, dtype=torch.float64)
    bias = 0.1 * torch.randn(4)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    leaves = [x, weights.router.requires_grad_(), weights.gate_up.requires_grad_(), weights.down.requires_grad_()]

    def layer(x, router_weight, gate_up, down):
        out, aux = moeflux.moe(x, moeflux.MoEWeights(router_weight, gate_up, down, bias), top_k=2, router=router,
                               backend="torch")  # fmt: skip
        return out, aux.load_balancing_loss, aux.sequence_balance_loss, aux.router_z_loss, aux.expert_weights

    assert torch.autograd.gradcheck(layer, leaves, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_expert_bias_is_a_buffer_that_steers_the_router(backend):
    router = moeflux.RouterConfig(scoring="sigmoid", expert_bias=True)
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=1, router=router)
    layer = moeflux.MoE(config, backend=backend)
    assert "expert_bias" in dict(layer.named_buffers()) and "expert_bias" in layer.state_dict()
    assert "expert_bias" not in dict(layer.named_parameters())
    assert layer.expert_bias.dtype == torch.float32 and layer.expert_bias.tolist() == [0.0] * 4
    x = torch.randn(10, 16)
    _, before = layer(x)
    layer.expert_bias[2] = 10.0  # in place: the next forward routes with it
    out, after = layer(x)
    assert (after.expert_ids == 2).all()
    torch.testing.assert_close(after.expert_weights, after.router_probs[:, 2:3])  # unbiased weights
    (out.sum() + after.load_balancing_loss).backward()
    assert layer.expert_bias.grad is None and layer.router.grad is not None
    assert not torch.equal(before.expert_ids, after.expert_ids)


def test_module_without_expert_bias_has_none():
    layer = moeflux.MoE(moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=1))
    assert layer.expert_bias is None and layer.weights.expert_bias is None
    assert "expert_bias" not in layer.state_dict()


@pytest.mark.parametrize("backend", _backends())
def test_jitter_perturbs_the_router_input_in_training_only(backend):
    router = moeflux.RouterConfig(jitter=0.5)
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=8, top_k=2, num_shared_experts=1,
                               router=router)  # fmt: skip
    layer = moeflux.MoE(config, backend=backend)
    x = torch.randn(32, 16)
    plain_out, plain = moeflux.moe(x, layer.weights, 2, backend=backend)
    layer.eval()
    eval_out, evaluated = layer(x)
    assert torch.equal(eval_out, plain_out) and torch.equal(evaluated.router_probs, plain.router_probs)
    layer.train()
    out, jittered = layer(x)
    assert not torch.allclose(jittered.router_probs, plain.router_probs)
    # The experts see the un-jittered input: the output is the reference on x with the jittered choice.
    expected = moe64(x, layer.router, layer.gate_up, layer.down, jittered.expert_ids, jittered.expert_weights, 1)
    assert rel_l2(out, expected) < 1e-5
    _, again = layer(x)  # fresh noise at every training forward
    assert not torch.equal(again.router_probs, jittered.router_probs)


def test_aux_sequence_loss_splits_a_batched_input():
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=2)
    layer = moeflux.MoE(config, backend="torch")
    x = torch.randn(3, 5, 16)
    _, aux = layer(x)
    expected = moeflux.sequence_balance_loss(aux.router_probs, aux.expert_ids, sequence_length=5)
    torch.testing.assert_close(aux.sequence_balance_loss, expected)
    _, flat = layer(x.reshape(15, 16))  # [T, H]: one sequence, the batch-level loss
    torch.testing.assert_close(flat.sequence_balance_loss, flat.load_balancing_loss)
