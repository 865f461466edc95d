"""A float64 MoE written independently of moeflux's code: a per-token loop, no sorting."""

from __future__ import annotations

import torch


def softmax64(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    exp = shifted.exp()
    return exp / exp.sum(dim=-1, keepdim=True)


def swiglu64(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    g = x @ gate
    return (g / (1 + torch.exp(-g)) * (x @ up)) @ down


def moe64(x, router, gate_up, down, expert_ids, expert_weights, num_shared):
    """``out[t] = sum_j w[t, j] SwiGLU_{ids[t, j]}(x[t]) + sum_s SwiGLU_{E+s}(x[t])`` in float64,
    one token at a time. Weights use the packed layout of ``moeflux.MoEWeights``."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    E = router.shape[0]
    D = down.shape[1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        row = x[t : t + 1]
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            out[t] += float(expert_weights[t, j].detach()) * swiglu64(row, gate_up[e, :, :D], gate_up[e, :, D:], down[e])[0]
        for s in range(num_shared):
            e = E + s
            out[t] += swiglu64(row, gate_up[e, :, :D], gate_up[e, :, D:], down[e])[0]
    return out


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
