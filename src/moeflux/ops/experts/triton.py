"""Triton experts: dispatch plan -> gathered gate|up GEMM with fused SwiGLU -> down GEMM scaled
by the routing weight and scattered to pair order -> fixed-order sum of each token's rows.

Shared experts ride along as ``S`` extra slots per token (experts ``E .. E+S-1``, weight 1),
so one pair of grouped GEMM launches covers routed and shared work. The combine sums each
token's ``k' = k + S`` rows in slot order in float32: deterministic, no float atomics.

The GEMMs read the weights through :class:`moeflux.expert_tables.ExpertTables`, so packed
weights and the competition's separate per-expert tensors take the same kernels
(:func:`experts_triton_tables`); :func:`experts_triton` takes the packed tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeflux.expert_tables import ExpertTables
from moeflux.memory import check_fits, experts_forward_bytes, per_token_bytes
from moeflux.ops.dispatch import build_dispatch_plan
from moeflux.ops.experts import check_same_device
from moeflux.ops.grouped_matmul import GroupedMatmulConfig, grouped_matmul, select_config


@triton.jit
def _combine_kernel(
    pair_out_ptr,  # [T, TOP_K, H]
    out_ptr,  # [T, H]
    T,
    H,
    stride_pair_t,
    stride_pair_j,
    stride_out_t,
    TOP_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_th = (o_t < T)[:, None] & (o_h < H)[None, :]
    p_pair = pair_out_ptr + o_t[:, None].to(tl.int64) * stride_pair_t + o_h[None, :]  # [BLOCK_T, BLOCK_H]
    p_out = out_ptr + o_t[:, None].to(tl.int64) * stride_out_t + o_h[None, :]
    if ACCUMULATE:
        b_sum = tl.load(p_out, mask=m_th, other=0.0).to(tl.float32)
    else:
        b_sum = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # slot order: the same sum on every run
        b_sum += tl.load(p_pair + j * stride_pair_j, mask=m_th, other=0.0).to(tl.float32)
    tl.store(p_out, b_sum.to(out_ptr.dtype.element_ty), mask=m_th)


def combine_pairs(pair_out: torch.Tensor, out: torch.Tensor | None = None, *, accumulate: bool = False) -> torch.Tensor:
    """``out[t] = sum_j pair_out[t, j]`` over ``pair_out [T, k', H]`` (last dim contiguous),
    summed in slot order in float32 and returned in ``pair_out``'s dtype; written into ``out``
    (``[T, H]`` of any float dtype, last dim contiguous, e.g. a column slice of a wider
    tensor) when given, or added to it (``accumulate``: ``out[t] += ...``, in float32)."""
    T, top_k, H = pair_out.shape
    if accumulate and out is None:
        raise ValueError("combine_pairs(accumulate=True) needs the out tensor to add to")
    if out is None:
        out = torch.empty(T, H, device=pair_out.device, dtype=pair_out.dtype)
    if T == 0 or H == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(H))
    block_t = max(1, 4096 // block_h)
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    _combine_kernel[grid](
        pair_out, out, T, H, pair_out.stride(0), pair_out.stride(1), out.stride(0),
        TOP_K=top_k, ACCUMULATE=accumulate, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out


def pair_weights(expert_weights: torch.Tensor, num_shared: int) -> torch.Tensor:
    """``[T, k + S]`` float32: the routing weights, then weight 1 for each shared slot (one launch)."""
    return F.pad(expert_weights.to(torch.float32), (0, num_shared), value=1.0)


def experts_triton(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    num_routed: int,
    *,
    gate_up_config: GroupedMatmulConfig | None = None,
    down_config: GroupedMatmulConfig | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """:func:`experts_triton_tables` on packed weights: ``gate_up [E + S, H, 2D]`` (gate columns
    ``[:D]``, up ``[D:]``), ``down [E + S, D, H]``, ``num_routed = E``; experts ``E .. E+S-1``
    are the shared slices. Their tables are built on the device (no sync)."""
    experts = ExpertTables.from_packed(gate_up, down, num_routed)
    return experts_triton_tables(
        x, expert_ids, expert_weights, experts, gate_up_config=gate_up_config, down_config=down_config,
        check_ids=check_ids,
    )  # fmt: skip


def experts_triton_tables(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    experts: ExpertTables,
    *,
    gate_up_config: GroupedMatmulConfig | None = None,
    down_config: GroupedMatmulConfig | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * SwiGLU_{ids[t, j]}(x[t]) + sum_s SwiGLU_{E + s}(x[t])``, the
    function of :func:`moeflux.ops.experts.naive.experts_torch`, with no host sync once
    ``check_ids`` is off.

    Args:
        x: ``[T, H]`` tokens, float32 / float16 / bfloat16.
        expert_ids: ``[T, k]`` integer routed expert ids in ``[0, E)``.
        expert_weights: ``[T, k]`` their weights (cast to float32).
        experts: where the weights live (``x``'s dtype and device); experts ``E .. E+S-1``
            are the shared slices.
        gate_up_config, down_config: launch parameters of the two GEMMs (``select_config``
            when omitted).
        check_ids: verify ``0 <= expert_ids < E`` and raise ``IndexError`` otherwise; one
            host sync (see :func:`moeflux.ops.dispatch.build_dispatch_plan`). Turn it off inside
            CUDA graphs and for ids known good, such as the router's.

    Returns:
        ``[T, H]`` in ``x.dtype``. Each pair's down projection is rounded to ``x.dtype``
        before the float32 sum, as in the torch path. ``T = 0`` gives an empty ``[0, H]``.

    Raises:
        torch.OutOfMemoryError: on CUDA, before any launch, when the call needs more device
            memory than is free (:func:`moeflux.memory.experts_forward_bytes`).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {list(x.shape)}")
    T, H = x.shape
    D, num_routed, num_shared = experts.expert_size, experts.num_experts, experts.num_shared_experts
    check_same_device(x=x, expert_ids=expert_ids, expert_weights=expert_weights, weights=experts)
    if expert_ids.dim() != 2 or expert_ids.shape[0] != T or expert_weights.shape != expert_ids.shape:
        raise ValueError(
            f"expected expert_ids and expert_weights [T={T}, k], got {list(expert_ids.shape)} and "
            f"{list(expert_weights.shape)}"
        )
    if H != experts.hidden_size:
        raise ValueError(f"x has hidden size {H} but the experts' weights expect {experts.hidden_size}")
    top_k = expert_ids.shape[1] + num_shared
    num_pairs = T * top_k
    num_experts = num_routed + num_shared
    check_forward_memory(T, H, D, expert_ids.shape[1], num_routed, num_shared, x, training=False)
    if gate_up_config is None:
        gate_up_config = select_config(
            num_pairs, 2 * D, H, x.dtype, num_experts=num_experts, swiglu=True, gather=True, device=x.device
        )
    if down_config is None:
        down_config = select_config(num_pairs, H, D, x.dtype, num_experts=num_experts, device=x.device)

    plan = build_dispatch_plan(
        expert_ids, num_routed, num_shared_experts=num_shared, block_m=gate_up_config.block_m, check_ids=check_ids
    )
    # [P, D] in sorted order: silu(x W_gate) * (x W_up) for every pair.
    hidden = grouped_matmul(x, experts.gate_up, plan, gather=True, swiglu=True, config=gate_up_config)
    # [P, H] in pair order: w_pair * hidden W_down, ready for a per-token sum.
    pair_out = grouped_matmul(
        hidden, experts.down, plan, row_scale=pair_weights(expert_weights, num_shared).view(-1), scatter=True, config=down_config
    )
    return combine_pairs(pair_out.view(T, top_k, H))


def check_forward_memory(T, H, D, routed_k, num_routed, num_shared, x, *, training: bool) -> None:
    """:func:`moeflux.memory.check_fits` for the experts forward (``training``: with the
    pre-activations it saves for the backward)."""
    def workspace(tokens):
        usage = experts_forward_bytes(tokens, H, D, routed_k, num_routed, num_shared, x.dtype, training=training)
        return usage.peak

    what = "the Triton experts forward" + (" (training)" if training else "")
    check_fits(workspace(T), x.device, what, per_token=lambda: per_token_bytes(workspace, T))
