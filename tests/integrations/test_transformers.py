"""``moeflux.integrations.transformers``: patched transformers MoE models against the originals.

Every architecture is a tiny random model (2 decoder layers, H = 32, at least 8 experts) run
in float32 before and after the patch on the same tokens: hidden states of every layer,
logits, loss, router logits, the auxiliary loss and the gradient of every parameter agree to
float32 rounding on both backends (the Triton kernels run through the interpreter on the
CPU), and 20 greedy tokens are identical (torch backend).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeflux.integrations import transformers as integration
from moeflux.integrations.transformers import (
    ARCHITECTURES,
    apply_moeflux,
    apply_moeflux_to_mixtral,
    apply_moeflux_to_qwen3_moe,
    revert_moeflux,
)

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=None, pad_token_id=0,
)  # fmt: skip
# What each model exercises beyond softmax top-k (E routed experts, k per token, D expert width).
MODELS = {
    # E=8, k=2, chosen probabilities renormalised (norm_topk_prob).
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                      head_dim=8, intermediate_size=48),
    # k=1 with raw softmax weights; a sigmoid-gated shared expert of width 24, not a multiple of D=16.
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=16, norm_topk_prob=False,
                      shared_expert_intermediate_size=24, intermediate_size=48),
    # Prime E=11, k=3, raw softmax weights.
    "olmoe": dict(num_experts=11, num_experts_per_tok=3, intermediate_size=16, norm_topk_prob=False),
    # Always renormalised (no flag); D=24.
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=24),
    # Sigmoid scores, a random correction bias, the 2 best of 4 groups of 4, weights
    # renormalised and scaled by 2.5, one shared expert (the model's own MLP); float32 router.
    "deepseek_v3": dict(n_routed_experts=16, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=1,
                        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                        first_k_dense_replace=0, intermediate_size=48, num_key_value_heads=4, q_lora_rank=16,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
}  # fmt: skip
ARCHS = sorted(MODELS)
# float32 rounding: the patched path sums the same products in another order.
FORWARD_TOL = 2e-6
GRAD_TOL = 1e-5


def build(model_type: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**COMMON, **MODELS[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):  # zeros after init: make it choose
                module.e_score_correction_bias.normal_(0.0, 0.1)
    return model.eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model: torch.nn.Module, input_ids: torch.Tensor):
    """Forward with labels (loss includes the auxiliary loss where the model has one), backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids, output_hidden_states=True, output_router_logits=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Max abs error within ``tol`` of the largest expected magnitude."""
    assert actual.shape == expected.shape, what
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= tol * max(scale, 1e-30), f"{what}: max error {error:.3g} vs max |expected| {scale:.3g}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model_type", ARCHS)
def test_forward_and_gradients_match(model_type: str, backend: str) -> None:
    model = build(model_type)
    input_ids = tokens()
    expected, expected_grads = run(model, input_ids)
    assert apply_moeflux(model, backend=backend) is model
    actual, grads = run(model, input_ids)

    assert len(actual.hidden_states) == len(expected.hidden_states) == 3
    for layer, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        assert_close(a, e, FORWARD_TOL, f"hidden states {layer}")
    assert_close(actual.logits, expected.logits, FORWARD_TOL, "logits")
    assert_close(actual.loss, expected.loss, FORWARD_TOL, "loss")
    # The router is still the module transformers records the logits of (every model here
    # returns them but DeepSeek-V3 before transformers 5.24).
    assert type(actual) is type(expected)
    if getattr(expected, "router_logits", None) is not None:
        assert len(actual.router_logits) == len(expected.router_logits) == 2
        for a, e in zip(actual.router_logits, expected.router_logits, strict=True):
            assert_close(a, e, FORWARD_TOL, "router logits")
    else:
        assert getattr(actual, "router_logits", None) is None
    if getattr(expected, "aux_loss", None) is not None:
        assert_close(actual.aux_loss, expected.aux_loss, FORWARD_TOL, "aux loss")

    assert grads.keys() == expected_grads.keys()
    assert any("experts" in name for name in grads) and any("gate.weight" in name for name in grads)
    for name, expected_grad in expected_grads.items():
        assert_close(grads[name], expected_grad, GRAD_TOL, f"gradient of {name}")


@pytest.mark.parametrize("model_type", ARCHS)
def test_greedy_generation_identical(model_type: str) -> None:
    model = build(model_type)
    prompt = tokens(batch=2, length=5, seed=2)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=20, do_sample=False)
        apply_moeflux(model, backend="torch")
        actual = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert expected.shape == (2, 25)
    assert torch.equal(actual, expected)


def test_patch_keeps_the_models_own_parameters() -> None:
    """No copy, no new parameter: the experts run on views of the fused parameters, and the
    gradients land in them."""
    model = build("qwen3_moe")
    before = {name: (p.data_ptr(), p.shape) for name, p in model.named_parameters()}
    state_keys = list(model.state_dict())
    apply_moeflux(model)
    run(model, tokens())
    assert {name: (p.data_ptr(), p.shape) for name, p in model.named_parameters()} == before
    assert list(model.state_dict()) == state_keys
    experts = model.model.layers[0].mlp.experts
    weights = integration._expert_weights(experts)
    assert weights.gate_up.data_ptr() == experts.gate_up_proj.data_ptr()
    assert weights.down.data_ptr() == experts.down_proj.data_ptr()
    assert weights.gate_up.shape == (8, 32, 32) and weights.gate_up.stride(1) == 1  # [E, H, 2D], unit stride along H


def test_revert_restores_the_original_forward() -> None:
    model = build("deepseek_v3")
    input_ids = tokens()
    with torch.no_grad():
        expected = model(input_ids).logits
        apply_moeflux(model, backend="torch")
        revert_moeflux(model)
        actual = model(input_ids).logits
    assert torch.equal(actual, expected)  # bitwise: the model's own code ran
    assert not any("forward" in vars(module) for module in model.modules())


def test_moving_the_model_rebuilds_the_views() -> None:
    """``model.to(dtype)`` drops the cached views of the old storage; the next forward reads
    the new parameters (here float64, torch backend) and matches the original there."""
    model = build("olmoe", experts_implementation="eager").double()  # grouped_mm has no float64
    input_ids = tokens()
    with torch.no_grad():
        expected = model(input_ids).logits
        model.float()
        apply_moeflux(model, backend="torch")
        model(input_ids)
        experts = model.model.layers[0].mlp.experts
        assert integration._CACHE in vars(experts)
        model.double()
        assert integration._CACHE not in vars(experts)
        actual = model(input_ids).logits
    assert actual.dtype == torch.float64
    assert_close(actual, expected, 1e-12, "float64 logits")


def test_class_patch_applies_to_models_built_afterwards() -> None:
    from transformers.models.mixtral import modeling_mixtral

    original = modeling_mixtral.MixtralExperts.forward
    input_ids = tokens()
    with torch.no_grad():
        expected = build("mixtral")(input_ids).logits
    try:
        assert apply_moeflux_to_mixtral(backend="torch") is None
        assert modeling_mixtral.MixtralExperts.forward is not original
        patched = build("mixtral")
        with torch.no_grad():
            actual = patched(input_ids).logits
        # moeflux ran (its views are cached), and the class patch drops them when the
        # module moves, as the instance patch does.
        assert integration._CACHE in vars(patched.model.layers[0].mlp.experts)
        patched.double()
        assert integration._CACHE not in vars(patched.model.layers[0].mlp.experts)
    finally:
        revert_moeflux()
    assert modeling_mixtral.MixtralExperts.forward is original
    assert "_apply" not in vars(modeling_mixtral.MixtralExperts)
    assert_close(actual, expected, FORWARD_TOL, "logits")


def test_per_architecture_patch_leaves_other_models_alone() -> None:
    with pytest.raises(ValueError, match="has no sparse-MoE block moeflux can run"):
        apply_moeflux_to_qwen3_moe(build("mixtral"))


def test_failed_patch_changes_nothing() -> None:
    """Every block is checked before any is patched."""
    model = build("qwen3_moe")
    model.model.layers[1].mlp.experts.has_bias = True
    with pytest.raises(ValueError, match="has_bias=True"):
        apply_moeflux(model)
    assert not any(integration._PATCHED in vars(module) for module in model.modules())


def test_table_names_real_classes() -> None:
    """Every class the table names exists in the installed transformers (a rename would
    otherwise make ``apply_moeflux`` find nothing)."""
    import importlib

    for architecture in ARCHITECTURES.values():
        modeling = importlib.import_module(architecture.module)
        assert isinstance(getattr(modeling, architecture.router), type)
        assert isinstance(getattr(modeling, architecture.experts), type)


def test_patched_model_deep_copies() -> None:
    """A copy of a patched model (after a training forward) is patched too and reads its own
    parameters."""
    import copy

    model = build("qwen3_moe")
    apply_moeflux(model, backend="torch")
    run(model, tokens())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.experts.down_proj.mul_(2.0)  # the copy's own storage
        expected = model(tokens()).logits
        changed = twin(tokens()).logits
        twin.model.layers[0].mlp.experts.down_proj.div_(2.0)
        same = twin(tokens()).logits
    assert integration._PATCHED in vars(twin.model.layers[0].mlp.experts)
    assert not torch.allclose(changed, expected)
    assert torch.equal(same, expected)
