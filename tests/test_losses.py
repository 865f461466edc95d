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


def test_batch_balance_loss_normalises_sigmoid_scores_by_hand():
    # 2 tokens, 3 experts, k = 1: token 0 -> expert 0, token 1 -> expert 2.
    scores = torch.tensor([[0.8, 0.4, 0.0], [0.1, 0.1, 0.2]])
    # s' = [[2/3, 1/3, 0], [1/4, 1/4, 1/2]], P = [11/24, 7/24, 1/4], f = [1/2, 0, 1/2]
    # E * sum f P = 3 * (11/48 + 1/8) = 1.0625
    loss = moeflux.batch_balance_loss(scores, torch.tensor([1, 0, 1]), top_k=1)
    assert math.isclose(loss.item(), 1.0625, rel_tol=1e-6)
    # For probabilities that already sum to 1 it is Switch's loss.
    probs = torch.softmax(torch.randn(7, 5), -1)
    counts = torch.tensor([3, 0, 4, 5, 2])
    assert math.isclose(moeflux.batch_balance_loss(probs, counts, 2).item(),
                        moeflux.load_balancing_loss(probs, counts, 2).item(), rel_tol=1e-6)  # fmt: skip


def test_sequence_balance_loss_by_hand():
    # Two sequences of two tokens, E = 2, k = 1.
    scores = torch.tensor([[0.6, 0.2], [0.3, 0.3], [0.5, 0.5], [0.9, 0.1]])
    ids = torch.tensor([[0], [1], [0], [0]])
    # Sequence 0: f = [1/2, 1/2], P = [(3/4 + 1/2) / 2, (1/4 + 1/2) / 2] = [5/8, 3/8]: 2 * (5/16 + 3/16) = 1
    # Sequence 1: f = [1, 0], P = [(1/2 + 9/10) / 2, ...] = [7/10, 3/10]: 2 * 7/10 = 1.4
    loss = moeflux.sequence_balance_loss(scores, ids, sequence_length=2)
    assert math.isclose(loss.item(), (1.0 + 1.4) / 2, rel_tol=1e-6)


def test_sequence_balance_loss_against_a_loop_in_float64():
    torch.manual_seed(0)
    B, L, E, k = 3, 5, 6, 2
    scores = torch.rand(B * L, E, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(B * L)])
    expected = 0.0
    for b in range(B):
        rows = slice(b * L, (b + 1) * L)
        normalised = scores[rows] / scores[rows].sum(-1, keepdim=True)
        for e in range(E):
            f = (ids[rows] == e).sum().item() * E / (k * L)  # DeepSeek-V3's f_i = E / (k L) * count
            expected = expected + f * normalised[:, e].mean() / B
    loss = moeflux.sequence_balance_loss(scores, ids, L)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-12)
    (grad,) = torch.autograd.grad(loss, scores)
    (expected_grad,) = torch.autograd.grad(expected, scores)
    torch.testing.assert_close(grad, expected_grad)
    # One sequence of all the tokens is the batch-level loss.
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert math.isclose(moeflux.sequence_balance_loss(scores, ids, B * L).item(),
                        moeflux.batch_balance_loss(scores, counts, k).item(), rel_tol=1e-12)  # fmt: skip


def test_balance_losses_are_one_when_uniform_and_zero_without_tokens():
    scores = torch.full((4, 4), 0.3)  # sigmoid-like: rows need not sum to 1
    ids = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert math.isclose(moeflux.sequence_balance_loss(scores, ids, 2).item(), 1.0, rel_tol=1e-6)
    assert math.isclose(moeflux.batch_balance_loss(scores, torch.tensor([2, 2, 2, 2]), 2).item(), 1.0, rel_tol=1e-6)
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = moeflux.sequence_balance_loss(empty, torch.zeros(0, 2, dtype=torch.int64), 3)
    assert loss.item() == 0.0 and loss.requires_grad


def test_sigmoid_layer_reports_deepseek_losses():
    router = moeflux.RouterConfig(scoring="sigmoid", normalize_topk=True)
    config = moeflux.MoEConfig(hidden_size=8, expert_size=4, num_experts=5, top_k=2, router=router)
    layer = moeflux.MoE(config, backend="torch")
    x = torch.randn(3, 4, 8)
    _, aux = layer(x)
    scores = torch.sigmoid(x.reshape(12, 8).double() @ layer.router.double().T)
    torch.testing.assert_close(aux.router_probs.double(), scores)
    expected = moeflux.batch_balance_loss(scores, aux.tokens_per_expert, 2)
    assert math.isclose(aux.load_balancing_loss.item(), expected.item(), rel_tol=1e-5)
    expected = moeflux.sequence_balance_loss(scores, aux.expert_ids, 4)
    assert math.isclose(aux.sequence_balance_loss.item(), expected.item(), rel_tol=1e-5)
