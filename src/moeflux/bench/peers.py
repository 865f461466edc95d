"""Adapters for MoE layers of other packages, timed beside moeflux on the same weights.

Hugging Face transformers' Qwen3-MoE block is the peer: it is what most people run a MoE
model with, it needs no build step, and transformers 5 lets one block switch between its
expert implementations (``eager``: a loop over experts; ``grouped_mm``: ``torch._grouped_mm``).
The adapter times each once and keeps the fastest for the shape.

How its semantics line up with moeflux's (and the seed reference's):

* ``norm_topk_prob=False``: the chosen weights are the softmax probabilities, as in moeflux.
* The router ranks experts by float32 probabilities and casts the chosen weights to the
  input dtype; moeflux ranks by probabilities rounded to the input dtype and keeps float32
  weights. Near-ties may pick another expert, so its error columns sit a little above
  moeflux's: a difference of rule, not a bug.
* Qwen3-MoE has no shared expert. Where the shape has one (``S > 0``), the adapter adds
  transformers' own dense MLP (``Qwen3MoeMLP`` of width ``D * S``) on the same input, as
  DeepSeek-style models do beside their routed experts; its time is included.
"""

from __future__ import annotations

import time

import torch

from moeflux.bench.systems import System

EXPERT_IMPLEMENTATIONS = ("grouped_mm", "eager")


class TransformersQwen3Moe(System):
    """``transformers.models.qwen3_moe`` ``Qwen3MoeSparseMoeBlock`` (+ ``Qwen3MoeMLP`` as the
    shared expert), built from a one-layer config with the shape's sizes."""

    name = "hf-qwen3-moe"
    description = "Hugging Face transformers Qwen3MoeSparseMoeBlock (+ Qwen3MoeMLP shared expert), fastest experts impl"

    def available(self, device: torch.device) -> bool:
        try:
            import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401
        except ImportError as error:
            self.note = f"transformers' Qwen3-MoE does not import ({error}); pip install transformers"
            return False
        return True

    def prepare(self, case) -> None:
        super().prepare(case)
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock

        c, weights = case.config, case.seed_weights
        device, dtype = case.x.device, case.x.dtype
        shared_width = c.expert_size * c.num_shared_experts
        config = Qwen3MoeConfig(
            hidden_size=c.hidden_size, moe_intermediate_size=c.expert_size, num_experts=c.num_experts,
            num_experts_per_tok=c.top_k, norm_topk_prob=False, hidden_act="silu",
            intermediate_size=max(shared_width, 1), num_hidden_layers=1, experts_implementation="eager",
        )  # fmt: skip
        # Built on the meta device, then given storage: no random init of gigabytes of weights.
        with torch.device("meta"):
            block = Qwen3MoeSparseMoeBlock(config)
            shared = Qwen3MoeMLP(config, intermediate_size=shared_width) if shared_width else None
        # dtype first, on meta: storage is then allocated once, in the run's dtype.
        block = block.to(dtype).to_empty(device=device).requires_grad_(False)
        with torch.no_grad():
            block.gate.weight.copy_(weights["router.weight"])
            for e in range(c.num_experts):
                # transformers keeps [E, 2D, H] (gate rows, then up rows) and [E, H, D].
                block.experts.gate_up_proj[e, : c.expert_size].copy_(weights[f"experts.{e}.0.weight"].T)
                block.experts.gate_up_proj[e, c.expert_size :].copy_(weights[f"experts.{e}.1.weight"].T)
                block.experts.down_proj[e].copy_(weights[f"experts.{e}.2.weight"].T)
        if shared is not None:
            shared = shared.to(dtype).to_empty(device=device).requires_grad_(False)
            with torch.no_grad():
                shared.gate_proj.weight.copy_(weights["shared_experts.0.weight"].T)
                shared.up_proj.weight.copy_(weights["shared_experts.1.weight"].T)
                shared.down_proj.weight.copy_(weights["shared_experts.2.weight"].T)
        self.block, self.shared, self.config = block, shared, config
        self.note = f"experts_implementation={self._fastest_implementation()}"

    def _fastest_implementation(self) -> str:
        """Time each implementation that runs here over two calls after one warm-up; keep the fastest."""
        best, best_s = None, float("inf")
        for implementation in EXPERT_IMPLEMENTATIONS:
            self.config._experts_implementation = implementation
            try:
                with torch.no_grad():
                    self()
                    _sync(self.case.x.device)
                    begin = time.perf_counter()
                    self()
                    self()
                    _sync(self.case.x.device)
            except (RuntimeError, NotImplementedError, KeyError):
                continue  # this implementation does not run on this device or dtype
            elapsed = time.perf_counter() - begin
            if elapsed < best_s:
                best, best_s = implementation, elapsed
        if best is None:
            raise RuntimeError(f"no experts implementation of transformers ran here (tried {EXPERT_IMPLEMENTATIONS})")
        self.config._experts_implementation = best
        return best

    def __call__(self) -> torch.Tensor:
        x = self.case.x
        x3 = x.reshape(1, -1, x.shape[-1])
        out = self.block(x3)
        return out + self.shared(x3) if self.shared is not None else out

    def leaves(self) -> list[torch.Tensor]:
        modules = [self.block] + ([self.shared] if self.shared is not None else [])
        return [self.case.x] + [p for module in modules for p in module.parameters()]

    def release(self) -> None:
        super().release()
        self.block = self.shared = self.config = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
