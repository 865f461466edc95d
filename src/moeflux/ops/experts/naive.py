"""Plain-PyTorch experts: sort the (token, slot) pairs by expert, one grouped GEMM chain,
unsort, sum each token's k rows in a fixed order. Differentiable through autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def experts_torch(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    num_routed: int,
) -> torch.Tensor:
    T, H = x.shape
    top_k = expert_ids.shape[1]
    accumulate_dtype = torch.promote_types(x.dtype, torch.float32)

    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # sorted position -> (token, slot) pair
    tokens_per_expert = torch.bincount(flat_ids, minlength=num_routed)
    sorted_x = x[order // top_k]  # [T*k, H]
    sorted_out = _swiglu_grouped(sorted_x, gate_up[:num_routed], down[:num_routed], tokens_per_expert)
    sorted_out = sorted_out * expert_weights.reshape(-1)[order, None].to(sorted_out.dtype)
    pair_out = torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)  # back to (token, slot) order
    # A fixed-order sum over each token's k rows: deterministic, no atomics.
    out = pair_out.view(T, top_k, H).sum(dim=1, dtype=accumulate_dtype)

    for shared in range(num_routed, gate_up.shape[0]):
        out = out + _swiglu(x, gate_up[shared], down[shared]).to(accumulate_dtype)
    return out.to(x.dtype)


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def _swiglu_grouped(
    sorted_x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    if _grouped_mm_supported(sorted_x, gate_up, down):
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        gate, up = torch._grouped_mm(sorted_x, gate_up, offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down, offs=offsets)
    # One GEMM chain per expert; the split sizes need the counts on the host.
    chunks = sorted_x.split(tokens_per_expert.tolist())
    return torch.cat([_swiglu(chunk, gate_up[e], down[e]) for e, chunk in enumerate(chunks)])


def _grouped_mm_supported(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """``torch._grouped_mm`` runs on Hopper-or-newer CUDA GPUs in 16-bit floats, on operands
    whose base addresses and strides (but the unit one) are multiples of 16 bytes. Its inputs
    here: ``x [P, H]`` (contiguous), the weights as given, ``[P, 2D]`` gate|up halves (the up
    half starts ``D`` elements in) and ``[P, D]``; an odd ``H`` or ``D`` takes the loop."""
    if not (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    ):
        return False
    itemsize = x.element_size()
    widths = (x.shape[1], down.shape[1])  # H, D: the row strides of the fresh [P, .] operands
    weights_aligned = all(
        w.stride(-1) == 1 and w.data_ptr() % 16 == 0 and all(s * itemsize % 16 == 0 for s in w.stride()[:-1])
        for w in (gate_up, down)
    )
    return weights_aligned and all(width * itemsize % 16 == 0 for width in widths)
