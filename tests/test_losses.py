"""Auxiliary losses against values computed by hand."""

import math

import torch

import moeflux


def test_load_balancing_loss_by_hand():
    # 2 tokens, 3 experts, k = 1: token 0 -> expert 0, token 1 -> expert 2.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    counts = torch.tensor([1, 0, 1])
    # f = [1/2, 0, 1/2], P = [0.3, 0.3, 0.4]; E * sum f P = 3 * (0.15 + 0.2) = 1.05
    assert math.isclose(moeflux.load_balancing_loss(probs, counts, top_k=1).item(), 1.05, rel_tol=1e-6)


def test_load_balancing_loss_is_one_when_uniform():
    probs = torch.full((4, 4), 0.25)
    counts = torch.tensor([2, 2, 2, 2])
    assert math.isclose(moeflux.load_balancing_loss(probs, counts, top_k=2).item(), 1.0, rel_tol=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    lse = torch.logsumexp(logits, -1)
    expected = (math.log(2) ** 2 + math.log(math.e + 1 / math.e) ** 2) / 2
    assert math.isclose(moeflux.router_z_loss(lse).item(), expected, rel_tol=1e-6)


def test_layer_losses_match_their_formulas_and_train_the_router():
    config = moeflux.MoEConfig(hidden_size=8, expert_size=4, num_experts=5, top_k=2)
    layer = moeflux.MoE(config, backend="torch")
    x = torch.randn(12, 8)
    _, aux = layer(x)
    logits = x.double() @ layer.router.double().T
    probs = torch.softmax(logits, -1)
    fraction = torch.bincount(aux.expert_ids.flatten(), minlength=5).double() / (12 * 2)
    assert math.isclose(aux.load_balancing_loss.item(), 5 * (fraction * probs.mean(0)).sum().item(), rel_tol=1e-5)
    assert math.isclose(aux.router_z_loss.item(), (torch.logsumexp(logits, -1) ** 2).mean().item(), rel_tol=1e-5)
    (aux.load_balancing_loss + aux.router_z_loss).backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    assert layer.gate_up.grad is None  # the losses depend on the router alone
