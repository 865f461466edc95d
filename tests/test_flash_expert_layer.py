"""FlashExpert (PEER): product-key routing against brute force over all experts, and the
layer against a direct flash_expert call."""

import pytest
import torch

from moeflux.flash_expert_layer import FlashExpert
from moeflux.ops.flash_expert import flash_expert

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def brute_force_route(layer: FlashExpert, x: torch.Tensor):
    """Score all E = n**2 experts of every head, take the top k: what product keys must match."""
    n, half = layer.num_keys, layer.query_dim // 2
    query = (x.double() @ layer.query.weight.double().t()).view(x.shape[0], layer.num_heads, 2, half)
    keys = layer.sub_keys.double()  # [heads, 2, n, half]
    first = torch.einsum("thd,hnd->thn", query[:, :, 0], keys[:, 0])
    second = torch.einsum("thd,hnd->thn", query[:, :, 1], keys[:, 1])
    all_scores = (first[:, :, :, None] + second[:, :, None, :]).reshape(x.shape[0], layer.num_heads, n * n)
    scores, indices = all_scores.topk(layer.top_k, dim=-1)
    return indices.reshape(x.shape[0], -1), torch.softmax(scores, dim=-1).reshape(x.shape[0], -1)


@pytest.mark.parametrize(
    "num_experts, top_k, num_heads",
    [(64, 4, 1), (64, 8, 2), (16, 6, 1)],  # the last: top_k > n = 4, every pair is a candidate
)
def test_product_keys_match_brute_force_top_k(num_experts, top_k, num_heads):
    torch.manual_seed(0)
    layer = FlashExpert(24, num_experts, top_k, num_heads=num_heads, query_dim=12)
    x = torch.randn(20, 24)
    indices, weights = layer.route(x)
    expected_indices, expected_weights = brute_force_route(layer, x)
    assert indices.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 16)])
def test_layer_matches_direct_flash_expert_call(shape, backend):
    torch.manual_seed(1)
    layer = FlashExpert(16, 64, 4, num_heads=2, backend=backend)
    x = torch.randn(*shape)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    tokens = x.reshape(-1, 16)
    indices, weights = layer.route(tokens)
    direct = flash_expert(tokens, layer.down_weights, layer.up_weights, indices, weights, backend="torch")
    torch.testing.assert_close(out.reshape(-1, 16), direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_backward_reaches_every_parameter(backend):
    torch.manual_seed(2)
    layer = FlashExpert(16, 36, 3, num_heads=2, query_dim=8, backend=backend)
    x = torch.randn(2, 5, 16, requires_grad=True)
    layer(x).square().sum().backward()
    for name, parameter in [("x", x), *layer.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_layer_in_bfloat16():
    layer = FlashExpert(16, 64, 4, dtype=torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_experts=50), "perfect square"),
        (dict(query_dim=7), "query_dim"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=65), "top_k"),
        (dict(num_heads=0), "num_heads"),
    ],
)
def test_bad_layer_arguments_raise(kwargs, fragment):
    arguments = dict(hidden_size=16, num_experts=64, top_k=4) | kwargs
    with pytest.raises(ValueError, match=fragment):
        FlashExpert(**arguments)


def test_wrong_input_width_raises():
    with pytest.raises(ValueError, match="expects"):
        FlashExpert(16, 64, 4)(torch.randn(3, 15))
