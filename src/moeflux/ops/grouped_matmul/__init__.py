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

The kernel finds ``W[e]`` through a :class:`WeightTable` of per-expert addresses, so the
matrices may be slices of one stacked tensor (a ``weight`` tensor is turned into its table on
the fly) or separate tensors read in place (the competition's per-expert weights, see
:mod:`moeflux.expert_tables`).

``moe_matmul_ogs`` / ``moe_matmul_ogs_top1`` expose the same kernel under the
outer-gather-scatter contract of Helion's ``moe_matmul_ogs`` example (top-1 routing).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

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
        weight_tma: load the weight tiles through TMA descriptors built on the device (where
            the weights are 16-byte aligned and the GPU has TMA, Hopper and later) instead of
            per-thread pointers.
        persistent: one program per multiprocessor walks the tiles. With every load through
            TMA (``weight_tma``, and an input in sorted order) the tile and K loops are
            flattened, so a tile's epilogue overlaps the next tile's first loads.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    weight_tma: bool = False
    persistent: bool = False


@dataclass(frozen=True, eq=False)
class WeightTable:
    """Where each expert's weight matrices live, so the grouped matmul reads them in place.

    Expert ``e`` has ``M`` matrices of ``[K, N]``: ``W[e]`` (``M = 1``), or ``W_gate[e]`` and
    ``W_up[e]`` of a SwiGLU GEMM (``M = 2``). Every matrix has unit stride along ``N``
    (row-major), or along ``K`` (``column_major``: a transposed weight, as in a backward pass);
    the other dimension's stride, the leading stride, is the expert's own. Element ``(k, n)``
    of matrix ``m`` is at byte ``addresses[m, e] + (k * leading_strides[e] + n) * itemsize``
    (``(k + n * leading_strides[e]) * itemsize`` when ``column_major``).

    Attributes:
        addresses: ``[M, E']`` int64 data pointers (bytes), on the weights' device.
        leading_strides: ``[E']`` int64, in elements; an expert's matrices share it.
        column_major: unit stride along ``K`` rather than ``N``, in every matrix.
        rows: ``K``.
        cols: ``N``.
        dtype: the matrices' dtype.
        align: the largest power of two up to 16 dividing every address and leading stride in
            bytes. The kernel hands it to Triton, which knows nothing of a pointer or stride
            loaded from memory and would otherwise not vectorise the weight loads.
        tensors: the tensors the addresses point into, held so they outlive every launch that
            reads the table.
    """

    addresses: torch.Tensor
    leading_strides: torch.Tensor
    column_major: bool
    rows: int
    cols: int
    dtype: torch.dtype
    align: int
    tensors: tuple[torch.Tensor, ...] = field(repr=False)

    @property
    def num_experts(self) -> int:
        return self.addresses.shape[1]

    @property
    def num_matrices(self) -> int:
        return self.addresses.shape[0]

    @property
    def device(self) -> torch.device:
        return self.addresses.device

    @classmethod
    def from_stacked(cls, weight: torch.Tensor, *, swiglu: bool = False) -> "WeightTable":
        """The table of a stacked ``[E', K, N]`` weight, or ``[E', K, 2N]`` gate|up when ``swiglu``
        (unit stride along ``K`` or ``N``).

        Built on the weight's device from its data pointer and strides alone: two or three
        tiny launches, no host sync, so it can be captured in a CUDA graph. The device table
        is reused by later calls on the same stream with the same addresses and strides.
        """
        if weight.dim() != 3 or (swiglu and weight.shape[2] % 2 != 0):
            raise ValueError(
                f"expected a stacked weight [E', K, N] (even N for a gate|up swiglu weight), got {list(weight.shape)}"
            )
        num_experts, rows, width = weight.shape
        cols = width // 2 if swiglu else width
        column_major, leading = _layout(rows, cols, weight.stride(1), weight.stride(2))
        itemsize = weight.element_size()
        step = weight.stride(0) * itemsize
        # The up half starts N columns to the right of the gate half.
        first = [weight.data_ptr()] + ([weight.data_ptr() + cols * weight.stride(2) * itemsize] if swiglu else [])
        table = _stacked_table(tuple(first), step, leading, num_experts, weight.device)
        return cls(
            addresses=table[:-1], leading_strides=table[-1], column_major=column_major, rows=rows, cols=cols,
            dtype=weight.dtype, align=_alignment([*first, step, leading * itemsize]), tensors=(weight,),
        )  # fmt: skip

    @classmethod
    def from_matrices(cls, matrices: Sequence[Sequence[torch.Tensor]]) -> "WeightTable":
        """The table of separate ``[K, N]`` matrices, read in place: ``matrices[e]`` is expert
        ``e``'s ``(W,)`` or ``(W_gate, W_up)``, each any 2-D view.

        All matrices must share shape, dtype, device and unit-stride dimension, and an
        expert's matrices their strides. The addresses are gathered on the host and copied to
        the device: one small copy from pinned memory, asynchronous (not capturable in a CUDA graph).
        """
        if not matrices or not matrices[0]:
            raise ValueError("from_matrices needs at least one expert with at least one matrix")
        first = matrices[0][0]
        if first.dim() != 2:
            raise ValueError(f"matrices must be 2-D [K, N], got {list(first.shape)}")
        num_matrices, (rows, cols) = len(matrices[0]), first.shape
        shape, dtype, device = first.shape, first.dtype, first.device
        column_major = _layout(rows, cols, *first.stride())[0]
        # This runs on every call of the competition's entry point (~100 matrices): check the
        # whole set with cheap attribute reads first, and walk it slowly only to name a culprit.
        strides = [expert[0].stride() for expert in matrices]
        layouts = [_layout(rows, cols, *expert_strides) for expert_strides in strides]
        device_index = first.get_device()
        consistent = (
            all(len(expert) == num_matrices for expert in matrices)
            and all(layout[0] == column_major for layout in layouts)
            and all(
                m.shape == shape and m.dtype == dtype and m.get_device() == device_index and m.stride() == expert_strides
                for expert, expert_strides in zip(matrices, strides)
                for m in expert
            )
            and (first.is_cuda or all(m.device == device for expert in matrices for m in expert))
        )
        if not consistent:
            _raise_first_mismatch(matrices, shape, dtype, device, column_major, rows, cols)
        addresses = [[expert[m].data_ptr() for expert in matrices] for m in range(num_matrices)]
        leading_strides = [layout[1] for layout in layouts]
        host_table = torch.tensor([*addresses, leading_strides], dtype=torch.int64)
        if first.is_cuda:
            host_table = host_table.pin_memory()
        table = host_table.to(device, non_blocking=True)
        itemsize = first.element_size()
        return cls(
            addresses=table[:-1], leading_strides=table[-1], column_major=column_major, rows=rows, cols=cols,
            dtype=dtype, align=_alignment([*sum(addresses, []), *(s * itemsize for s in leading_strides)]),
            tensors=tuple(matrix for expert in matrices for matrix in expert),
        )  # fmt: skip


# Tables of stacked weights, kept for reuse: building one takes two or three tiny launches,
# and a training step reads five (the backward's transposed views too), whose host time
# showed in the small steps of Qwen3-30B-A3B (benchmarks/results/host-overhead-*). The key is
# everything the table holds, plus the stream whose launches filled it (another stream could
# read it before they ran); tables are neither reused nor kept during a CUDA graph capture,
# whose launches run only at replay.
_STACKED_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MAX_STACKED_TABLES = 64


def _stacked_table(
    first: tuple[int, ...], step: int, leading: int, num_experts: int, device: torch.device
) -> torch.Tensor:
    """``[len(first) + 1, E']`` int64: row ``m`` holds ``first[m] + e * step``, the last row
    ``leading``."""
    is_cuda = device.type == "cuda"
    capturing = is_cuda and torch.cuda.is_current_stream_capturing()
    key = (device, torch.cuda.current_stream(device).stream_id if is_cuda else None, first, step, leading, num_experts)
    table = None if capturing else _STACKED_TABLES.get(key)
    if table is not None:
        _STACKED_TABLES.move_to_end(key)
        return table
    table = torch.empty(len(first) + 1, num_experts, device=device, dtype=torch.int64)
    for row, address in zip(table, first):
        if step == 0:  # one matrix broadcast to every expert
            row.fill_(address)
        else:
            torch.arange(address, address + num_experts * step, step, out=row)
    table[-1].fill_(leading)
    if not capturing:
        _STACKED_TABLES[key] = table
        while len(_STACKED_TABLES) > _MAX_STACKED_TABLES:
            _STACKED_TABLES.popitem(last=False)
    return table


def _raise_first_mismatch(matrices, shape, dtype, device, column_major: bool, rows: int, cols: int) -> None:
    """Name the first matrix of :meth:`WeightTable.from_matrices` that breaks its contract."""
    num_matrices = len(matrices[0])
    for e, expert in enumerate(matrices):
        if len(expert) != num_matrices:
            raise ValueError(f"expert {e} has {len(expert)} matrices, expert 0 has {num_matrices}")
        strides = expert[0].stride()
        expert_column_major = _layout(rows, cols, *strides)[0]
        for m, matrix in enumerate(expert):
            if (matrix.shape, matrix.stride(), matrix.dtype, matrix.device, expert_column_major) != (
                shape, strides, dtype, device, column_major
            ):  # fmt: skip
                raise ValueError(
                    f"matrix {m} of expert {e} is {matrix.dtype} {list(matrix.shape)} with strides "
                    f"{matrix.stride()} on {matrix.device}; expected {dtype} {list(shape)} on {device}, unit "
                    f"stride along {'K' if column_major else 'N'} as in every matrix and strides {strides} "
                    "as in its expert's first"
                )


def _layout(rows: int, cols: int, stride_k: int, stride_n: int) -> tuple[bool, int]:
    """``(column_major, leading stride)`` of a ``[K, N]`` matrix. A dimension of size 1 counts
    as unit-stride: the kernel never steps along it."""
    if stride_n == 1 or cols == 1:
        return False, stride_k
    if stride_k == 1 or rows == 1:
        return True, stride_n
    raise ValueError(
        f"the grouped matmul reads weights with unit stride along K or N; got strides ({stride_k}, {stride_n}) "
        "for a [K, N] matrix: pass .contiguous()"
    )


def _alignment(byte_values: Sequence[int]) -> int:
    """The largest power of two up to 16 (the widest load, in bytes) dividing every value."""
    return math.gcd(16, *byte_values)


def select_config(
    M_total: int,
    N: int,
    K: int,
    dtype: torch.dtype,
    *,
    num_experts: int = 1,
    swiglu: bool = False,
    gather: bool = False,
    column_major: bool = False,
    device: torch.device | None = None,
) -> GroupedMatmulConfig:
    """A launch config for ``M_total`` sorted rows over ``num_experts`` experts, ``W[e]`` of
    ``[K, N]`` (``N`` counts both halves when ``swiglu``), input rows gathered from tokens or
    in sorted order (``gather``), weights with unit stride along ``K`` or ``N``
    (``column_major``). Nothing is timed on the hot path:

    1. For row-major weights on a CUDA ``device`` whose GPU has a committed table (``moeflux/data/gemm_configs.json``,
       written by ``benchmarks/gemm_table.py`` from the sweeps of ``benchmarks/moe_forward_gpu.py``),
       the entry for this dtype, ``swiglu``, ``N``, ``K`` and rows per expert (rounded up to a
       power of two), if any: the table keeps only configs that beat the heuristic below by 3%
       in every sweep.
    2. Otherwise a heuristic:

       * ``block_m`` follows the mean rows per expert (16 .. 128): a tile never straddles
         experts, so a tile much taller than an expert's rows is mostly padding (decode).
       * ``block_n = 128``, ``block_k = 64`` (32 in float32, whose tiles are twice the bytes),
         smaller for narrower ``N`` / ``K``; a plain (non-SwiGLU) GEMM with full 128-row tiles
         takes ``block_n = 256``: measured 1.3x faster on the H100 for the down projections of
         the competition and model shapes (benchmarks/results/moe-forward-h100-2026-11-25).
       * 8 warps once the fp32 accumulators reach ``128 x 128`` elements, else 4.
       * as many pipeline stages (2 .. 4) as fit in about 160 KiB of shared memory.
       * swizzle groups of 32 (SwiGLU) or 16 row tiles with 128-row tiles, else 8.
       * plain GEMMs with 128-row tiles load the weights through TMA, and walk the tiles
         persistently when the input is in sorted order (not gathered).
    """
    rows_per_expert = -(-M_total // max(num_experts, 1))
    if device is not None and device.type == "cuda" and not column_major:  # the table holds forward GEMMs
        tuned = tuned_config(_gpu_family(device), dtype, swiglu, N, K, rows_per_expert)
        if tuned is not None:
            return tuned
    return heuristic_config(rows_per_expert, N, K, dtype, swiglu=swiglu, gather=gather)


@functools.lru_cache(maxsize=256)
def heuristic_config(
    rows_per_expert: int, N: int, K: int, dtype: torch.dtype, *, swiglu: bool, gather: bool = False
) -> GroupedMatmulConfig:
    """:func:`select_config`'s rule for shapes the committed table does not list."""
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
    element_size = dtype.itemsize
    block_k = min(32 if element_size >= 4 else 64, _at_least_16(K))
    weight_blocks = 2 if swiglu else 1
    accumulator_elements = block_m * block_n * weight_blocks
    num_warps = 8 if accumulator_elements >= 128 * 128 else 4
    stage_bytes = (block_m * block_k + weight_blocks * block_k * block_n) * element_size
    num_stages = max(2, min(4, (160 * 1024) // stage_bytes))
    # Row tiles per swizzle group: an expert's weights come from HBM once per group holding
    # its tiles, and ragged experts (8-9 tiles at 1024 rows) make a group of 8 straddle two.
    # With 128-row tiles, 32 (SwiGLU) and 16 (plain) measured 2-7% faster than 8 at the
    # competition, Mixtral and DeepSeek shapes and within 2% at Qwen3's
    # (benchmarks/results/group-probe-h100-2026-11-25-e9d7ea7).
    group_m = (32 if swiglu else 16) if block_m == 128 else 8
    # 128-row plain GEMMs take their weights through TMA, and with a sorted input (TMA as
    # well) walk the tiles persistently. Against pointer loads on the H100
    # (benchmarks/results/gemm-gap-probe-h100-2026-11-25-{07728d5,8641aaa}): gathered input,
    # TMA weights 4-12% faster (the training forward's and the backward's first GEMM); sorted
    # input, persistent 3-10% faster (the down projection, the backward's d_x GEMM), except
    # Mixtral's down projection (K = 14336, 4.5% slower: a long K loop has little epilogue
    # to hide). SwiGLU GEMMs gain nothing from either and keep pointer loads.
    plain_128 = block_m == 128 and not swiglu
    weight_tma = plain_128
    persistent = plain_128 and not gather
    return GroupedMatmulConfig(block_m, block_n, block_k, group_m, num_warps, num_stages, weight_tma, persistent)


def tuned_key(dtype: torch.dtype, swiglu: bool, N: int, K: int, rows_per_expert: int) -> str:
    """The committed table's key: ``"bfloat16 swiglu N=4096 K=7168 rows<=1024"``."""
    bucket = 1 << max(int(rows_per_expert) - 1, 0).bit_length()
    return f"{str(dtype).removeprefix('torch.')} {'swiglu' if swiglu else 'plain'} N={N} K={K} rows<={bucket}"


def tuned_config(
    gpu: str | None, dtype: torch.dtype, swiglu: bool, N: int, K: int, rows_per_expert: int
) -> GroupedMatmulConfig | None:
    """The committed table's config for this GEMM on ``gpu`` (``"H100"``, ``"H200"``), or None."""
    if gpu is None:
        return None
    entry = _tuned_tables().get(gpu, {}).get(tuned_key(dtype, swiglu, N, K, rows_per_expert))
    return None if entry is None else GroupedMatmulConfig(*entry["config"])


@functools.cache
def _tuned_tables() -> dict[str, dict[str, dict]]:
    text = importlib.resources.files("moeflux").joinpath("data/gemm_configs.json").read_text()
    return {gpu: table["entries"] for gpu, table in json.loads(text)["gpus"].items()}


@functools.cache
def _gpu_family_of(name: str) -> str | None:
    for family in ("H100", "H200"):
        if family in name:
            return family
    return None


def _gpu_family(device: torch.device) -> str | None:
    """``"H100"`` / ``"H200"`` (the GPUs with a committed table), else None."""
    return _gpu_family_of(_device_name(device.index if device.index is not None else torch.cuda.current_device()))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _at_least_16(size: int) -> int:
    """The next power of two >= ``size``, at least 16 (``tl.dot``'s smallest tile side)."""
    return max(16, 1 << max(size - 1, 0).bit_length())


def grouped_matmul(
    x: torch.Tensor,
    weight: torch.Tensor | WeightTable,
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
        weight: ``[E', K, N]``, or ``[E', K, 2N]`` packed gate|up when ``swiglu``, in ``x``'s
            dtype; or (Triton only) a :class:`WeightTable` of ``E'`` experts with one ``[K, N]``
            matrix each, two (gate, up) when ``swiglu``.
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

        table = weight if isinstance(weight, WeightTable) else WeightTable.from_stacked(weight, swiglu=swiglu)
        if config is None:
            width = 2 * table.cols if swiglu else table.cols
            config = select_config(
                plan.num_pairs, width, table.rows, x.dtype, num_experts=plan.num_experts, swiglu=swiglu, gather=gather,
                column_major=table.column_major, device=x.device,
            )  # fmt: skip
        return grouped_matmul_triton(
            x, table, plan, gather=gather, swiglu=swiglu, row_scale=row_scale, scatter=scatter, config=config, out=out
        )
    if backend == "torch":
        if isinstance(weight, WeightTable):
            raise TypeError("the torch backend reads a stacked weight tensor, not a WeightTable")
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
        config = select_config(A.shape[0], W.shape[2], W.shape[1], A.dtype, num_experts=W.shape[0], device=A.device)
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
    check_ids: bool = True,
) -> torch.Tensor:
    """``C[t] = A[t] @ W[expert_ids[t]]`` for ``A [T, K]``, ``W [E, K, N]``, ``expert_ids [T]``.

    ``check_ids`` verifies ``0 <= expert_ids < E`` (``IndexError`` otherwise) at the cost of one
    host sync; see :func:`moeflux.ops.dispatch.build_dispatch_plan`."""
    if A.dim() != 2 or W.dim() != 3:
        raise ValueError(
            f"moe_matmul_ogs_top1 expects A [T, K] and W [E, K, N]; got {list(A.shape)} and {list(W.shape)}"
        )
    if expert_ids.shape != (A.shape[0],):
        raise ValueError(f"expert_ids must be [T] = [{A.shape[0]}], got {list(expert_ids.shape)}")
    if config is None:
        config = select_config(A.shape[0], W.shape[2], W.shape[1], A.dtype, num_experts=W.shape[0], device=A.device)
    plan = build_dispatch_plan(expert_ids[:, None], W.shape[0], block_m=config.block_m, check_ids=check_ids)
    return grouped_matmul(A, W, plan, gather=True, scatter=True, config=config, backend=backend)


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor | WeightTable,
    plan: DispatchPlan,
    *,
    gather: bool,
    swiglu: bool,
    row_scale: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    if isinstance(weight, WeightTable):
        num_experts, K, width, num_matrices = weight.num_experts, weight.rows, weight.cols, weight.num_matrices
        shape = f"a table of {num_experts} experts x {num_matrices} [{K}, {width}] matrices"
    else:
        shape = str(list(weight.shape))
        if weight.dim() != 3:
            raise ValueError(f"grouped_matmul expects weight [E', K, N], got {shape}")
        if swiglu and weight.shape[2] % 2 != 0:
            raise ValueError(f"swiglu needs a packed gate|up weight of even width, got {weight.shape[2]}")
        num_experts, K, width = weight.shape
        width, num_matrices = (width // 2, 2) if swiglu else (width, 1)
    if x.dim() != 2:
        raise ValueError(f"grouped_matmul expects x [rows, K], got {list(x.shape)}")
    if num_matrices != (2 if swiglu else 1):
        raise ValueError(f"swiglu reads two matrices per expert (gate, up), a plain GEMM one; got {shape}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; cast one to match")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"grouped_matmul supports float32, float16 and bfloat16, got {x.dtype}")
    expected_rows = plan.num_tokens if gather else plan.num_pairs
    if x.shape[0] != expected_rows:
        what = "tokens (gather)" if gather else "sorted rows"
        raise ValueError(f"x has {x.shape[0]} rows but the plan has {expected_rows} {what}")
    if num_experts != plan.num_experts or K != x.shape[1]:
        raise ValueError(f"weight {shape} does not match {plan.num_experts} experts and K={x.shape[1]}")
    if row_scale is not None and (row_scale.shape != (plan.num_pairs,) or row_scale.dtype != torch.float32):
        raise ValueError(f"row_scale must be float32 [{plan.num_pairs}], got {row_scale.dtype} {list(row_scale.shape)}")
    if out is not None and (out.shape != (plan.num_pairs, width) or out.dtype != x.dtype):
        raise ValueError(f"out must be {x.dtype} [{plan.num_pairs}, {width}], got {out.dtype} {list(out.shape)}")
    devices = {x.device, weight.device, plan.sorted_to_pair.device}
    if len(devices) != 1:
        raise ValueError(f"x, weight and the plan live on different devices {sorted(map(str, devices))}")
