"""The calls behind the ``hf-*`` cases of ``tests/test_errors.py``
(``moeflux.integrations.transformers``), on tiny random transformers models.

transformers is imported inside each call, so collecting ``tests/test_errors.py`` stays cheap.
"""

from __future__ import annotations

import sys
from unittest import mock

import torch


def tiny_model(model_type: str = "qwen3_moe", **overrides) -> torch.nn.Module:
    """One decoder layer, H = 16, E = 4 experts of width 8, k = 2."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=16, num_experts_per_tok=2)  # fmt: skip
    per_model = {
        "qwen3_moe": dict(head_dim=8, moe_intermediate_size=8, num_experts=4),
        "deepseek_v3": dict(moe_intermediate_size=8, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                            first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                            qk_nope_head_dim=4, v_head_dim=8),
    }  # fmt: skip
    config = AutoConfig.for_model(model_type, **{**sizes, **per_model[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config)


def apply(model: object, **kwargs) -> None:
    from moeflux.integrations.transformers import apply_moeflux

    apply_moeflux(model, **kwargs)


def no_moe_block() -> None:
    apply(torch.nn.Sequential(torch.nn.Linear(16, 16)))


def model_not_module() -> None:
    apply("Qwen/Qwen3-30B-A3B")


def unknown_backend() -> None:
    apply(tiny_model(), backend="cuda")


def experts_with_bias() -> None:
    model = tiny_model()
    model.model.layers[0].mlp.experts.has_bias = True
    apply(model)


def experts_not_silu() -> None:
    apply(tiny_model(hidden_act="gelu"))


def groups_too_few_experts() -> None:
    """DeepSeek-V3 keeping 1 group of 2 experts but choosing 4 (transformers would pick
    experts outside the kept group)."""
    apply(tiny_model("deepseek_v3", topk_group=1, num_experts_per_tok=4))


def transformers_missing() -> None:
    from moeflux.integrations.transformers import apply_moeflux_to_qwen3_moe

    with mock.patch.dict(sys.modules, {"transformers.models.qwen3_moe.modeling_qwen3_moe": None}):
        apply_moeflux_to_qwen3_moe()
