"""Routing: the Triton kernel against the torch path, and both against float64 math."""

import pytest
import torch

from moeflux.ops.routing import route
from tests.reference import softmax64

# (what it exercises, T, E, k)
SHAPES = [
    ("one token", 1, 8, 2),
    ("E not a power of two", 37, 5, 2),
    ("k = 1", 33, 32, 1),
    ("k = E", 9, 6, 6),
    ("E = 1", 4, 1, 1),
    ("many experts, several token blocks", 70, 256, 8),
    ("E = 300, above the next power of two's half", 5, 300, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", SHAPES, ids=[s[0] for s in SHAPES])
def test_triton_routing_matches_torch(case, dtype):
    _, T, E, k = case
    logits = (2 * torch.randn(T, E)).to(dtype)
    expected = route(logits, k, backend="torch")
    actual = route(logits, k, backend="triton")
    assert torch.equal(actual.expert_ids, expected.expert_ids)
    assert torch.equal(actual.tokens_per_expert, expected.tokens_per_expert)
    assert actual.tokens_per_expert.dtype == torch.int64 and actual.expert_ids.dtype == torch.int64
    assert int(actual.tokens_per_expert.sum()) == T * k
    torch.testing.assert_close(actual.router_probs, expected.router_probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(actual.expert_weights, expected.expert_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(actual.logsumexp, expected.logsumexp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_routing_against_float64(backend):
    logits = 3 * torch.randn(50, 12)
    r = route(logits, 3, backend=backend)
    probs64 = softmax64(logits)
    assert torch.allclose(r.router_probs.double(), probs64, atol=1e-7)
    assert torch.equal(r.expert_ids, probs64.topk(3, dim=1).indices)
    assert torch.allclose(r.logsumexp.double(), torch.logsumexp(logits.double(), 1), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_go_to_the_lower_expert_id(backend):
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    r = route(logits, 2, backend=backend)
    assert r.expert_ids.tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ranking_uses_probabilities_rounded_to_the_input_dtype(backend):
    # Experts 0 and 2 differ by less than half a bfloat16 ulp of their probability: in
    # bfloat16 they tie, so the lower id wins even though expert 2 is larger in float32.
    logits = torch.tensor([[0.0, -4.0, 2.0**-9, -4.0, -1.0]], dtype=torch.bfloat16)
    probs = torch.softmax(logits.float(), -1)
    assert probs[0, 2] > probs[0, 0] and probs[0, 2].bfloat16() == probs[0, 0].bfloat16()
    assert route(logits, 1, backend=backend).expert_ids.tolist() == [[0]]


@pytest.mark.parametrize("normalize", [False, True])
def test_triton_routing_backward_matches_torch(normalize):
    logits = torch.randn(13, 7)
    grads = {}
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        r = route(leaf, 3, normalize=normalize, backend=backend)
        torch.manual_seed(0)
        g_probs, g_weights, g_lse = torch.randn(13, 7), torch.randn(13, 3), torch.randn(13)
        loss = (r.router_probs * g_probs).sum() + (r.expert_weights * g_weights).sum() + (r.logsumexp * g_lse).sum()
        loss.backward()
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-6)


def test_poisoned_outputs_are_all_written(monkeypatch):
    """Every output element is written: buffers start as NaN / -1 instead of empty memory."""
    import moeflux.ops.routing.triton as routing_triton

    real_empty = torch.empty

    def poisoned_empty(*shape, dtype=None, **kwargs):
        tensor = real_empty(*shape, dtype=dtype, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    monkeypatch.setattr(routing_triton.torch, "empty", poisoned_empty)
    r = route(torch.randn(67, 11), 4, backend="triton")
    for tensor in (r.router_probs, r.expert_weights, r.logsumexp):
        assert not torch.isnan(tensor).any()
    assert (r.expert_ids >= 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments(backend):
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(3, 4), 5, backend=backend)
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(3, 4), 0, backend=backend)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route(torch.randn(3, 4, 2), 1, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        route(torch.ones(3, 4, dtype=torch.int32), 1, backend=backend)
