"""Run a Hugging Face transformers MoE model on moeflux: one call, then generate and train.

    python3 examples/transformers_drop_in.py

Builds a tiny random Qwen3-MoE (2 layers, 16 experts, 4 per token), generates 20 greedy tokens
before and after ``apply_moeflux``, then takes one AdamW step on a batch, the router's
load-balancing loss included. The same call patches Mixtral, OLMoE, Qwen2-MoE and DeepSeek-V3
models (``moeflux.integrations.transformers.ARCHITECTURES``); a pretrained model works the
same way (``AutoModelForCausalLM.from_pretrained(...)``, then ``apply_moeflux(model)``).
On a GPU the blocks run moeflux's Triton kernels in bfloat16; on the CPU its PyTorch path.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeflux.integrations.transformers import apply_moeflux


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=True, initializer_range=0.05,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    prompt = torch.randint(2, config.vocab_size, (2, 8), device=device)
    with torch.no_grad():
        before = model.generate(prompt, max_new_tokens=20, do_sample=False)

    apply_moeflux(model)  # every sparse-MoE block now routes and runs its experts on moeflux

    with torch.no_grad():
        after = model.generate(prompt, max_new_tokens=20, do_sample=False)
    new_before, new_after = before[:, prompt.shape[1] :], after[:, prompt.shape[1] :]
    same = int((new_after == new_before).sum())
    print(f"greedy generation: {same} of {new_before.numel()} new tokens as before the patch")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(2, config.vocab_size, (4, 64), device=device)
    # With the router logits, loss = LM loss + router_aux_loss_coef * load-balancing loss.
    out = model(batch, labels=batch, output_router_logits=True)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after_step = model(batch, labels=batch).loss
    print(f"one training step: loss {out.loss.item():.4f} -> {after_step.item():.4f} "
          f"(load-balancing loss {out.aux_loss.item():.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
