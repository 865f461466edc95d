"""Plain-PyTorch grouped matmul: one GEMM per expert, the reference the Triton kernel is
tested against. Reads the plan's offsets on the host, so it syncs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflux.ops.dispatch import DispatchPlan


def grouped_matmul_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: DispatchPlan,
    *,
    gather: bool = False,
    swiglu: bool = False,
    row_scale: torch.Tensor | None = None,
    scatter: bool = False,
) -> torch.Tensor:
    """Same contract as :func:`moeflux.ops.grouped_matmul.grouped_matmul`; computes in float32
    (float64 for float64 inputs) and rounds once to ``x.dtype``."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    width = weight.shape[2] // 2 if swiglu else weight.shape[2]
    sorted_to_pair = plan.sorted_to_pair.long()
    out = torch.empty(plan.num_pairs, width, device=x.device, dtype=x.dtype)
    offsets = plan.expert_offsets.tolist()
    for expert in range(plan.num_experts):
        rows = torch.arange(offsets[expert], offsets[expert + 1], device=x.device)
        pairs = sorted_to_pair[rows]
        source_rows = pairs // plan.top_k if gather else rows
        acc = x[source_rows].to(compute_dtype) @ weight[expert].to(compute_dtype)
        if swiglu:
            gate, up = acc.chunk(2, dim=-1)
            acc = F.silu(gate) * up
        if row_scale is not None:
            acc = acc * row_scale[pairs].to(compute_dtype)[:, None]
        out[pairs if scatter else rows] = acc.to(x.dtype)
    return out
