"""The grouped matmul kernel family: ``out[rows(e)] = in[gather(rows(e))] @ W[e]``.

One kernel, four constexpr switches (``GATHER``, ``SWIGLU``, ``SCALE``, ``SCATTER``), so every
variant shares one main loop (``_grouped_matmul_tile``). A tile is ``[BLOCK_M, BLOCK_N]`` of the
output: row tile ``i_m`` of the plan's tile schedule (rows of a single expert) times column
tile ``i_n``. By default a program owns one tile: the grid's M extent is the host-known bound
``max_tiles``, and programs past the device-side tile count exit at once, so nothing is read
back to the host. ``PERSISTENT``: one program per multiprocessor walks the tiles up to the
device-side count instead.

The weights are read in place through a :class:`WeightTable`: expert ``e``'s matrix starts at
the address ``w_addresses[e]`` (its up matrix, with ``SWIGLU``, at ``w_up_addresses[e]``), has
unit stride along ``N`` (along ``K`` when ``W_COLUMN_MAJOR``) and the leading stride
``w_leading_strides[e]`` along the other dimension, so one kernel serves a stacked weight
tensor and separate per-expert tensors alike, for two or three scalar loads per tile. Triton
sees no alignment in a pointer or stride loaded from memory, so the table's alignment
(``W_ALIGN`` bytes) is declared with ``tl.multiple_of``: without it the weight loads would be
split into 2-byte accesses (checked in sm_90 PTX). The unit stride is a constexpr for the same reason:
Triton vectorises along a dimension it knows to be contiguous.

Without ``GATHER`` the input rows of a tile are consecutive, so ``X_TMA`` loads them through a
TMA tensor descriptor (Hopper's bulk tensor copy engine) instead of per-thread pointers:
measured up to 1.1x faster on the H100 for the down projection (``benchmarks/tma_probe_gpu.py``).
Rows past the input's end (and columns past ``K``) come back as zeros; rows past the tile's
end are never stored. ``W_TMA`` loads the weight tiles through descriptors built on the device
per tile from the table (so separate per-expert tensors work too; Triton takes their scratch
memory from the allocator installed by ``_ensure_descriptor_allocator``). With both operands
through TMA the persistent loop is flattened, so a tile's epilogue overlaps the next tile's
loads. Which GEMMs use which mode is :func:`moeflux.ops.grouped_matmul.heuristic_config`'s
choice, from ``benchmarks/gemm_gap_probe_gpu.py``.

Rows are addressed with int64 offsets (``P * H`` passes 2^31 in large batches, e.g. 70k
tokens x 4 slots x H = 8192). Loads in the K loop are unmasked in M and N: rows past the
tile's end are redirected to the tile's first row and columns past ``N`` wrap around, both
in bounds; their results are never stored. Only a ragged K tail needs a mask (``EVEN_K=False``).

``DOT_IN_FP32`` is on only for bfloat16 in Triton's CPU interpreter, whose ``tl.dot`` (3.6)
multiplies bfloat16 operands as their raw uint16 bits; upcasting first is exact (bf16
products fit in fp32), so the interpreter computes what the GPU's bf16 MMA computes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation
from triton.tools.tensor_descriptor import TensorDescriptor

from moeflux.ops.dispatch import DispatchPlan
from moeflux.ops.grouped_matmul import GroupedMatmulConfig, WeightTable


@triton.jit
def _dot(b_a, b_b, b_acc, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``b_acc + b_a @ b_b`` (fp32 accumulator)."""
    if DOT_IN_FP32:
        return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), b_acc, input_precision=INPUT_PRECISION)
    return tl.dot(b_a, b_b, b_acc, input_precision=INPUT_PRECISION)


@triton.jit
def _tile_coordinates(i_program, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    """``(i_m, i_n)`` of output tile ``i_program``. Swizzle: ``GROUP_M`` consecutive row tiles
    (mostly one expert) share each column block of ``W[e]`` while it is in L2, and each
    group's input rows are reused across all column tiles."""
    tiles_per_group = GROUP_M * num_n_tiles
    first_m = (i_program // tiles_per_group) * GROUP_M
    group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
    i_m = first_m + (i_program % tiles_per_group) % group_size
    i_n = (i_program % tiles_per_group) // group_size
    return i_m, i_n


@triton.jit
def _grouped_matmul_tile(
    i_m, i_n, x_ptr, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr,
    sorted_to_pair_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, N, K, top_k,
    stride_x_m, stride_x_k, stride_out_m, stride_out_n,
    GATHER: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr, SCATTER: tl.constexpr,
    EVEN_K: tl.constexpr, W_COLUMN_MAJOR: tl.constexpr, X_TMA: tl.constexpr, W_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, W_ALIGN: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Output tile ``(i_m, i_n)``: row tile ``i_m`` of the schedule times column tile ``i_n``."""
    i_e = tl.load(tile_expert_ptr + i_m)
    row_start = tl.load(tile_row_start_ptr + i_m)
    row_end = tl.minimum(row_start + BLOCK_M, tl.load(expert_offsets_ptr + i_e + 1))
    # A flattened persistent loop finds a tile's rows (and pairs) after its K loop, so they
    # hold no registers through it; elsewhere before it, where the loop hides their latency.
    ROWS_AFTER_LOOP: tl.constexpr = X_TMA and W_TMA and PERSISTENT
    if not ROWS_AFTER_LOOP:
        o_r, m_r, o_pair = _tile_rows(row_start, row_end, sorted_to_pair_ptr, GATHER or SCALE or SCATTER, BLOCK_M)
    if GATHER:
        o_x = o_pair // top_k
    elif not X_TMA:
        o_x = o_r

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_n = o_n < N
    o_w_n = o_n % N  # columns past N wrap around: in bounds, never stored
    o_k = tl.arange(0, BLOCK_K)
    if not X_TMA:
        p_x = x_ptr + o_x[:, None].to(tl.int64) * stride_x_m + o_k[None, :] * stride_x_k  # [BLOCK_M, BLOCK_K]
    # W[e] from the table, with the alignment Triton cannot see in loaded values (W_ALIGN bytes).
    dtype = out_ptr.dtype.element_ty
    element_bytes: tl.constexpr = dtype.primitive_bitwidth // 8
    w_address = tl.load(w_addresses_ptr + i_e)
    p_w_e = tl.multiple_of(w_address.to(tl.pointer_type(dtype)), W_ALIGN)
    w_leading_stride = tl.multiple_of(tl.load(w_leading_strides_ptr + i_e), W_ALIGN // element_bytes)
    if SWIGLU:
        # W_up[e] as an element offset from W_gate[e]: a scalar beside one pointer tile costs
        # fewer registers than a second tile (the SwiGLU GEMM is at the register limit).
        w_up_offset = (tl.load(w_up_addresses_ptr + i_e) - w_address) // element_bytes
        w_up_offset = tl.multiple_of(w_up_offset, W_ALIGN // element_bytes)
    if W_TMA:
        # Descriptors over W[e] (and W_up[e]) as stored; the copy engine zero-fills past K and N.
        if W_COLUMN_MAJOR:
            w_desc = tl.make_tensor_descriptor(p_w_e, [N, K], [w_leading_stride, 1], [BLOCK_N, BLOCK_K])
            if SWIGLU:
                w_up_desc = tl.make_tensor_descriptor(p_w_e + w_up_offset, [N, K], [w_leading_stride, 1],
                                                      [BLOCK_N, BLOCK_K])  # fmt: skip
        else:
            w_desc = tl.make_tensor_descriptor(p_w_e, [K, N], [w_leading_stride, 1], [BLOCK_K, BLOCK_N])
            if SWIGLU:
                w_up_desc = tl.make_tensor_descriptor(p_w_e + w_up_offset, [K, N], [w_leading_stride, 1],
                                                      [BLOCK_K, BLOCK_N])  # fmt: skip
    else:
        if W_COLUMN_MAJOR:
            stride_w_k, stride_w_n = 1, w_leading_stride
        else:
            stride_w_k, stride_w_n = w_leading_stride, 1
        p_w = p_w_e + o_k[:, None] * stride_w_k + o_w_n[None, :] * stride_w_n  # [BLOCK_K, BLOCK_N]
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SWIGLU:
        b_acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        if not EVEN_K:
            m_k = o_k < K - k_start
        if W_TMA:
            b_w = _load_weight_tile(w_desc, k_start, i_n * BLOCK_N, W_COLUMN_MAJOR)
        elif EVEN_K:
            b_w = tl.load(p_w)  # [BLOCK_K, BLOCK_N]
        else:
            b_w = tl.load(p_w, mask=m_k[:, None], other=0.0)
        if X_TMA:
            b_x = x_ptr.load([row_start, k_start])  # [BLOCK_M, BLOCK_K], zeros past K
        elif EVEN_K:
            b_x = tl.load(p_x)
        else:
            b_x = tl.load(p_x, mask=m_k[None, :], other=0.0)
        b_acc = _dot(b_x, b_w, b_acc, INPUT_PRECISION, DOT_IN_FP32)
        if SWIGLU:
            if W_TMA:
                b_w_up = _load_weight_tile(w_up_desc, k_start, i_n * BLOCK_N, W_COLUMN_MAJOR)
            elif EVEN_K:
                b_w_up = tl.load(p_w + w_up_offset)
            else:
                b_w_up = tl.load(p_w + w_up_offset, mask=m_k[:, None], other=0.0)
            b_acc_up = _dot(b_x, b_w_up, b_acc_up, INPUT_PRECISION, DOT_IN_FP32)
        if not X_TMA:
            p_x += BLOCK_K * stride_x_k
        if not W_TMA:
            p_w += BLOCK_K * stride_w_k

    if ROWS_AFTER_LOOP:
        o_r, m_r, o_pair = _tile_rows(row_start, row_end, sorted_to_pair_ptr, SCALE or SCATTER, BLOCK_M)
    if SWIGLU:
        b_acc = b_acc * tl.sigmoid(b_acc) * b_acc_up  # silu(gate) * up, in fp32
    if SCALE:
        b_acc = b_acc * tl.load(row_scale_ptr + o_pair)[:, None]
    if SCATTER:
        o_out = o_pair
    else:
        o_out = o_r
    p_out = out_ptr + o_out[:, None].to(tl.int64) * stride_out_m + o_n[None, :] * stride_out_n
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_r[:, None] & m_n[None, :])


@triton.jit
def _tile_rows(row_start, row_end, sorted_to_pair_ptr, LOAD_PAIRS: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(o_r, m_r, o_pair)``: a tile's sorted rows, which of them are its expert's, and their
    pairs (``o_r`` itself unless ``LOAD_PAIRS``). Rows past the tile's end re-read its first row."""
    o_r = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_r = o_r < row_end
    o_r = tl.where(m_r, o_r, row_start)
    if LOAD_PAIRS:
        o_pair = tl.load(sorted_to_pair_ptr + o_r)  # [BLOCK_M]
    else:
        o_pair = o_r
    return o_r, m_r, o_pair


@triton.jit
def _load_weight_tile(w_desc, k_start, n_start, W_COLUMN_MAJOR: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` weight tile at ``(k_start, n_start)`` through a descriptor."""
    if W_COLUMN_MAJOR:
        b_w = w_desc.load([n_start, k_start]).T
    else:
        b_w = w_desc.load([k_start, n_start])
    return b_w


@triton.jit
def _grouped_matmul_kernel(
    x_ptr,  # [T, K] tokens (GATHER) or [P, K] sorted rows; a tensor descriptor of the latter (X_TMA)
    w_addresses_ptr,  # [E'] int64: address of W[e] ([K, N]), or of W_gate[e] (SWIGLU)
    w_up_addresses_ptr,  # [E'] int64: address of W_up[e] (SWIGLU)
    w_leading_strides_ptr,  # [E'] int64: stride of W[e] (and W_up[e]) along K, or N (W_COLUMN_MAJOR)
    out_ptr,  # [P, N]: sorted order, or pair order (SCATTER)
    row_scale_ptr,  # [P] float32, pair order (SCALE)
    sorted_to_pair_ptr,  # [P] int32
    expert_offsets_ptr,  # [E' + 1] int32
    tile_expert_ptr,  # [max_tiles] int32
    tile_row_start_ptr,  # [max_tiles] int32
    num_tiles_ptr,  # [1] int32
    N,
    K,
    max_tiles,
    top_k,
    stride_x_m,
    stride_x_k,
    stride_out_m,
    stride_out_n,
    GATHER: tl.constexpr,
    SWIGLU: tl.constexpr,
    SCALE: tl.constexpr,
    SCATTER: tl.constexpr,
    EVEN_K: tl.constexpr,
    W_COLUMN_MAJOR: tl.constexpr,
    X_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    W_ALIGN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # Flattening the tile and K loops lets the pipeliner start a tile's loads under the
        # previous tile's epilogue; it pipelines only copy-engine loads there, so pointer
        # loads (a gathered input) keep the loops nested.
        num_m_tiles = tl.load(num_tiles_ptr)
        for i_program in tl.range(tl.program_id(0), num_m_tiles * num_n_tiles, NUM_PROGRAMS,
                                  flatten=X_TMA and W_TMA):  # fmt: skip
            i_m, i_n = _tile_coordinates(i_program, num_m_tiles, num_n_tiles, GROUP_M)
            _grouped_matmul_tile(
                i_m, i_n, x_ptr, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr,
                sorted_to_pair_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, N, K, top_k,
                stride_x_m, stride_x_k, stride_out_m, stride_out_n, GATHER, SWIGLU, SCALE, SCATTER, EVEN_K,
                W_COLUMN_MAJOR, X_TMA, W_TMA, PERSISTENT, W_ALIGN, INPUT_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    else:
        # The grid covers the host-known bound max_tiles; programs past the real tile count exit.
        # (Two call sites on purpose: one loop for both modes, a bound check inside it, spilled
        # the flattened persistent kernel, 0 -> 260 bytes in sm_90 ptxas's report.)
        i_m, i_n = _tile_coordinates(tl.program_id(0), max_tiles, num_n_tiles, GROUP_M)
        if i_m < tl.load(num_tiles_ptr):
            _grouped_matmul_tile(
                i_m, i_n, x_ptr, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr,
                sorted_to_pair_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, N, K, top_k,
                stride_x_m, stride_x_k, stride_out_m, stride_out_n, GATHER, SWIGLU, SCALE, SCATTER, EVEN_K,
                W_COLUMN_MAJOR, X_TMA, W_TMA, PERSISTENT, W_ALIGN, INPUT_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip


def _input_precision(dtype: torch.dtype) -> str:
    """float32 inputs follow torch's matmul TF32 switch, so results agree with ``x @ W``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _loads_input_by_tma(x: torch.Tensor, gather: bool) -> bool:
    """Whether the input rows go through a TMA descriptor: sorted-order input (no gather), with
    the layout TMA needs (unit stride along K, 16-byte aligned base and row stride), on a GPU
    with the copy engine (compute capability 9+) or in Triton's interpreter (so CI runs it)."""
    if gather or x.shape[0] == 0 or x.shape[1] == 0 or x.stride(1) != 1:
        return False
    if x.data_ptr() % 16 != 0 or (x.stride(0) * x.element_size()) % 16 != 0:
        return False
    return _has_copy_engine(x.device)


def _has_copy_engine(device: torch.device) -> bool:
    """A GPU with TMA (compute capability 9+), or Triton's interpreter (so CI runs those paths)."""
    return device.type == "cpu" or (device.type == "cuda" and _capability_major(device.index) >= 9)


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int | None) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ensure_descriptor_allocator() -> None:
    """Descriptors built on the device live in scratch memory that Triton asks its allocator
    for at launch; install one that takes it from torch's caching allocator (and so from a
    CUDA graph's pool during capture) unless the caller has set their own."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.empty(size, dtype=torch.int8, device=device)


def grouped_matmul_triton(
    x: torch.Tensor,
    weight: WeightTable,
    plan: DispatchPlan,
    *,
    gather: bool,
    swiglu: bool,
    row_scale: torch.Tensor | None,
    scatter: bool,
    config: GroupedMatmulConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel (arguments checked by :func:`moeflux.ops.grouped_matmul.grouped_matmul`)."""
    K, N = x.shape[1], weight.cols
    if out is None:
        out = torch.empty(plan.num_pairs, N, device=x.device, dtype=x.dtype)
    plan = plan.with_block_m(config.block_m)
    if plan.max_tiles == 0 or N == 0:
        return out
    sorted_to_pair = plan.sorted_to_pair
    scale = row_scale is not None
    row_scale = sorted_to_pair if row_scale is None else row_scale.contiguous()  # unused when SCALE is off
    up_addresses = weight.addresses[1] if swiglu else weight.addresses[0]  # unused without SWIGLU
    x_tma = _loads_input_by_tma(x, gather)
    x_operand = TensorDescriptor(x, list(x.shape), list(x.stride()), [config.block_m, config.block_k]) if x_tma else x
    num_tiles_bound = plan.max_tiles * triton.cdiv(N, config.block_n)
    w_tma = config.weight_tma and weight.align == 16 and _has_copy_engine(x.device)
    if w_tma:
        _ensure_descriptor_allocator()
    num_programs = min(_multiprocessors(x.device), num_tiles_bound) if config.persistent else num_tiles_bound
    # `weight` holds the tensors its addresses point into until the launch is queued; after
    # that the stream orders any reuse of their memory behind the kernel.
    _grouped_matmul_kernel[(num_programs,)](
        x_operand, weight.addresses[0], up_addresses, weight.leading_strides, out, row_scale, sorted_to_pair,
        plan.expert_offsets, plan.tile_expert, plan.tile_row_start, plan.num_tiles,
        N, K, plan.max_tiles, plan.top_k,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        GATHER=gather, SWIGLU=swiglu, SCALE=scale, SCATTER=scatter, EVEN_K=K % config.block_k == 0,
        W_COLUMN_MAJOR=weight.column_major, X_TMA=x_tma, W_TMA=w_tma, PERSISTENT=config.persistent,
        NUM_PROGRAMS=num_programs,
        W_ALIGN=weight.align, INPUT_PRECISION=_input_precision(x.dtype),
        DOT_IN_FP32=x.device.type == "cpu" and x.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
