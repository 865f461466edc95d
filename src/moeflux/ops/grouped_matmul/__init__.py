"""Grouped matmul over a dispatch plan: ``out[rows(e)] = in[gather(rows(e))] @ W[e]``.

``grouped_matmul`` is the one entry point; ``backend`` picks the Triton kernel
(:mod:`moeflux.ops.grouped_matmul.triton`) or the plain-PyTorch per-expert loop
(:mod:`moeflux.ops.grouped_matmul.naive`) it is tested against. Sorted row ``r`` of expert
``e`` (see :class:`moeflux.ops.dispatch.DispatchPlan`) computes, in float32:

* ``acc = in[src(r)] @ W[e]`` with ``src(r) = sorted_to_pair[r] // k'`` when ``gather`` (the
  input holds tokens), else ``src(r) = r`` (the input is already in sorted order);
* ``swiglu``: ``W[e]`` is a packed ``[K, 2N]`` gate|up weight and ``acc = silu(in @ W_gate) * (in @ W_up)``;
* ``row_scale``: ``acc *= row_scale[sorted_to_pair[r]]`` (a float32 weight per pair);
* the row is written, in the input's dtype, to ``out[r]``, or to ``out[sorted_to_pair[r]]``
  (pair order) when ``scatter``.

``moe_matmul_ogs`` / ``moe_matmul_ogs_top1`` expose the same kernel under the
outer-gather-scatter contract of Helion's ``moe_matmul_ogs`` example (top-1 routing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflux.ops.dispatch import DispatchPlan, build_dispatch_plan, plan_from_sorted_order


@dataclass(frozen=True)
class GroupedMatmulConfig:
    """Launch parameters of the grouped matmul kernel.

    Attributes:
        block_m: rows per tile (the dispatch plan is re-tiled to it); at least 16.
        block_n: output columns per tile (for ``swiglu``: of the gate and of the up half each).
        block_k: reduction step.
        group_m: M tiles per swizzle group: consecutive programs sweep ``group_m`` row tiles
            (mostly of one expert) before moving to the next column tile, so a column block
            of ``W[e]`` and the group's input rows stay in L2.
        num_warps: warps per program.
        num_stages: software-pipeline depth of the K loop.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def select_config(
    M_total: int, N: int, K: int, dtype: torch.dtype, *, num_experts: int = 1, swiglu: bool = False
) -> GroupedMatmulConfig:
    """A launch config for ``M_total`` sorted rows over ``num_experts`` experts, ``W[e]`` of
    ``[K, N]`` (``N`` counts both halves when ``swiglu``). A heuristic, not a search: nothing
    is timed on the hot path.

    * ``block_m`` follows the mean rows per expert (16 .. 128): a tile never straddles
      experts, so a tile much taller than an expert's rows is mostly padding (decode).
    * ``block_n = 128``, ``block_k = 64`` (32 in float32, whose tiles are twice the bytes),
      smaller for narrower ``N`` / ``K``; a plain (non-SwiGLU) GEMM with full 128-row tiles
      takes ``block_n = 256``: measured 1.3x faster on the H100 for the down projections of
      the competition and model shapes (benchmarks/results/moe-forward-h100-2026-11-25).
    * 8 warps once the fp32 accumulators reach ``128 x 128`` elements, else 4.
    * as many pipeline stages (2 .. 4) as fit in about 160 KiB of shared memory.
    """
    rows_per_expert = -(-M_total // max(num_experts, 1))
    if rows_per_expert <= 16:
        block_m = 16
    elif rows_per_expert <= 32:
        block_m = 32
    elif rows_per_expert < 256:
        block_m = 64
    else:
        block_m = 128
    # Narrow weights (tests, tiny experts) shrink the tile instead of masking most of it.
    widest_n = 256 if block_m == 128 and not swiglu and K >= 512 else 128
    block_n = min(widest_n, _at_least_16(N // 2 if swiglu else N))
    element_size = torch.empty((), dtype=dtype).element_size()
    block_k = min(32 if element_size >= 4 else 64, _at_least_16(K))
    weight_blocks = 2 if swiglu else 1
    accumulator_elements = block_m * block_n * weight_blocks
    num_warps = 8 if accumulator_elements >= 128 * 128 else 4
    stage_bytes = (block_m * block_k + weight_blocks * block_k * block_n) * element_size
    num_stages = max(2, min(4, (160 * 1024) // stage_bytes))
    return GroupedMatmulConfig(block_m, block_n, block_k, 8, num_warps, num_stages)


def _at_least_16(size: int) -> int:
    """The next power of two >= ``size``, at least 16 (``tl.dot``'s smallest tile side)."""
    return max(16, 1 << max(size - 1, 0).bit_length())


def grouped_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: DispatchPlan,
    *,
    gather: bool = False,
    swiglu: bool = False,
    row_scale: torch.Tensor | None = None,
    scatter: bool = False,
    config: GroupedMatmulConfig | None = None,
    out: torch.Tensor | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """``out[rows(e)] = epilogue(x[gather(rows(e))] @ weight[e])`` for every expert ``e`` of ``plan``.

    Args:
        x: ``[T, K]`` tokens when ``gather``, else ``[P, K]`` rows in sorted order;
            float32 / float16 / bfloat16, any strides.
        weight: ``[E', K, N]``, or ``[E', K, 2N]`` packed gate|up when ``swiglu``; ``x``'s dtype.
        plan: the dispatch plan (``P = plan.num_pairs``, ``E' = plan.num_experts``).
        gather: sorted row ``r`` reads ``x[sorted_to_pair[r] // k']``.
        swiglu: write ``silu(x @ W_gate) * (x @ W_up)`` (width ``N``).
        row_scale: ``[P]`` float32 in pair order; multiplies row ``r`` by ``row_scale[sorted_to_pair[r]]``.
        scatter: write row ``r`` to ``out[sorted_to_pair[r]]`` (pair order, ``[T, k', N]`` flattened).
        config: launch parameters (Triton only); ``select_config`` when omitted.
        out: optional preallocated ``[P, N]`` output in ``x``'s dtype.
        backend: ``"triton"`` or ``"torch"`` (the reference loop; host-syncs).

    Returns:
        ``[P, N]`` in ``x``'s dtype; every row is written (rows of all experts cover ``0..P-1``).
    """
    _check_args(x, weight, plan, gather=gather, swiglu=swiglu, row_scale=row_scale, out=out)
    if backend == "triton":
        from moeflux.ops.grouped_matmul.triton import grouped_matmul_triton

        if config is None:
            config = select_config(
                plan.num_pairs, weight.shape[2], weight.shape[1], x.dtype, num_experts=plan.num_experts, swiglu=swiglu
            )
        return grouped_matmul_triton(
            x, weight, plan, gather=gather, swiglu=swiglu, row_scale=row_scale, scatter=scatter, config=config, out=out
        )
    if backend == "torch":
        from moeflux.ops.grouped_matmul.naive import grouped_matmul_torch

        result = grouped_matmul_torch(
            x, weight, plan, gather=gather, swiglu=swiglu, row_scale=row_scale, scatter=scatter
        )
        return result if out is None else out.copy_(result)
    raise ValueError(f"unknown grouped_matmul backend {backend!r}; expected 'triton' or 'torch'")


def moe_matmul_ogs(
    A: torch.Tensor,
    W: torch.Tensor,
    expert_token_counts: torch.Tensor,
    expert_token_offsets: torch.Tensor,
    sorted_to_orig_token_idx: torch.Tensor,
    *,
    config: GroupedMatmulConfig | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """Top-1 outer-gather-scatter matmul: ``C[t] = A[t] @ W[expert(t)]``.

    Args:
        A: ``[T, K]`` tokens.
        W: ``[E, K, N]`` expert weights.
        expert_token_counts: ``[E]`` tokens per expert.
        expert_token_offsets: ``[E + 1]`` exclusive prefix sum of the counts.
        sorted_to_orig_token_idx: ``[T]`` sorted position -> token (tokens grouped by expert).

    Returns:
        ``[T, N]`` in ``A``'s dtype; rows of tokens no expert owns are left unwritten, so the
        inputs must cover every token (as they do when built from one expert id per token).
    """
    if A.dim() != 2 or W.dim() != 3 or sorted_to_orig_token_idx.shape != (A.shape[0],):
        raise ValueError(
            f"moe_matmul_ogs expects A [T, K], W [E, K, N], sorted_to_orig_token_idx [T]; got "
            f"{list(A.shape)}, {list(W.shape)}, {list(sorted_to_orig_token_idx.shape)}"
        )
    if expert_token_counts.shape != (W.shape[0],) or expert_token_offsets.shape != (W.shape[0] + 1,):
        raise ValueError(
            f"expected expert_token_counts [{W.shape[0]}] and expert_token_offsets [{W.shape[0] + 1}], got "
            f"{list(expert_token_counts.shape)} and {list(expert_token_offsets.shape)}"
        )
    if config is None:
        config = select_config(A.shape[0], W.shape[2], W.shape[1], A.dtype, num_experts=W.shape[0])
    plan = plan_from_sorted_order(
        expert_token_counts, expert_token_offsets, sorted_to_orig_token_idx, top_k=1, block_m=config.block_m
    )
    return grouped_matmul(A, W, plan, gather=True, scatter=True, config=config, backend=backend)


def moe_matmul_ogs_top1(
    A: torch.Tensor,
    W: torch.Tensor,
    expert_ids: torch.Tensor,
    *,
    config: GroupedMatmulConfig | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """``C[t] = A[t] @ W[expert_ids[t]]`` for ``A [T, K]``, ``W [E, K, N]``, ``expert_ids [T]``."""
    if expert_ids.shape != (A.shape[0],):
        raise ValueError(f"expert_ids must be [T] = [{A.shape[0]}], got {list(expert_ids.shape)}")
    if config is None:
        config = select_config(A.shape[0], W.shape[2], W.shape[1], A.dtype, num_experts=W.shape[0])
    plan = build_dispatch_plan(expert_ids[:, None], W.shape[0], block_m=config.block_m)
    return grouped_matmul(A, W, plan, gather=True, scatter=True, config=config, backend=backend)


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: DispatchPlan,
    *,
    gather: bool,
    swiglu: bool,
    row_scale: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or weight.dim() != 3:
        raise ValueError(
            f"grouped_matmul expects x [rows, K] and weight [E', K, N]; got {list(x.shape)}, {list(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; cast one to match")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"grouped_matmul supports float32, float16 and bfloat16, got {x.dtype}")
    expected_rows = plan.num_tokens if gather else plan.num_pairs
    if x.shape[0] != expected_rows:
        what = "tokens (gather)" if gather else "sorted rows"
        raise ValueError(f"x has {x.shape[0]} rows but the plan has {expected_rows} {what}")
    if weight.shape[0] != plan.num_experts or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight {list(weight.shape)} does not match {plan.num_experts} experts and K={x.shape[1]}"
        )
    if swiglu and weight.shape[2] % 2 != 0:
        raise ValueError(f"swiglu needs a packed gate|up weight of even width, got {weight.shape[2]}")
    if row_scale is not None and (row_scale.shape != (plan.num_pairs,) or row_scale.dtype != torch.float32):
        raise ValueError(f"row_scale must be float32 [{plan.num_pairs}], got {row_scale.dtype} {list(row_scale.shape)}")
    width = weight.shape[2] // 2 if swiglu else weight.shape[2]
    if out is not None and (out.shape != (plan.num_pairs, width) or out.dtype != x.dtype):
        raise ValueError(f"out must be {x.dtype} [{plan.num_pairs}, {width}], got {out.dtype} {list(out.shape)}")
    devices = {x.device, weight.device, plan.sorted_to_pair.device}
    if len(devices) != 1:
        raise ValueError(f"x, weight and the plan live on different devices {sorted(map(str, devices))}")
