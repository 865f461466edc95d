"""Grouped weight gradient over a dispatch plan: ``dW[e] = a[rows(e)]^T @ b[rows(e)]``.

The backward of a grouped GEMM ``out[rows(e)] = in[rows(e)] @ W[e]`` needs, per expert, the
product of its input rows and its output-gradient rows, reduced over the rows. Sorted row
``r`` of expert ``e`` (``expert_offsets[e] <= r < expert_offsets[e + 1]``) contributes, in
float32::

    dW[e] += s(r) * a[src_a(r)]^T b[src_b(r)]      (an outer product [K] x [N])

where each operand's rows are read in one of three orders (``a_rows`` / ``b_rows``):

* ``"sorted"``: ``src(r) = r`` (the operand is already in sorted order, ``[P, .]``);
* ``"tokens"``: ``src(r) = sorted_to_pair[r] // k'`` (the forward's gather, ``[T, .]``);
* ``"pairs"``: ``src(r) = sorted_to_pair[r]`` (a scattered output, ``[P, .]`` in pair order);

and ``s(r) = row_scale[sorted_to_pair[r]]`` (float32, pair order) when given, else 1.

Grid: one program per ``[BLOCK_K, BLOCK_N]`` tile of one ``dW[e]``, ``E' x cdiv(K, BK) x
cdiv(N, BN)`` programs (the narrower of K and N varying fastest, so the operand swept by the
programs running together stays in L2), each looping over its expert's rows in ``BLOCK_M`` steps, in row
order: deterministic, no atomics, and an expert with no rows stores exact zeros. The grid is
proportional to ``E'`` and the row loop is sequential per expert: an expert with many rows
(the shared experts see every token) makes its programs long. The experts are walked last to
first so those shared experts, which sit last, start first; splitting the rows of large
experts (split-K over rows) is left for later. Fine for the target shapes, whose ``K x N``
tiles alone fill the GPU many times over.

Main loop (what bounds the speed on the H100). Both operands are row-major ``[rows, width]``
and the reduction runs over rows, so both reach the MMA MN-major: wgmma reads them from shared
memory as copied (``tnspA.tnspB`` in the SASS; no transpose through registers). The pipeline
is what needs care: a step's rows are gathered through ``sorted_to_pair``, and when that id
load sits in the step, Triton's pipeliner spends a stage on it and (num_stages 3 or 4) keeps a
single step of operand copies in flight, waiting for all copies at every step, so each step
paid the full load latency. The ids are therefore loaded one step ahead (``prefetch_rows``)
and carried, leaving the copies free to run ``num_stages - 1`` steps ahead; a sorted operand
advances its pointers instead of recomputing them, and the token divisor ``k'`` is a
constexpr. A ``row_scale`` is applied by a separate elementwise pass over the sorted operand
(``prescale``) rather than in registers each step (the scaled operand then feeds wgmma from
registers, adding a third of the step's instructions; the former kernel also single-buffered
it).

TMA (``sorted_tma``, ``out_tma``; on with the ``128 x 256`` tiles of long row loops). The
operand in sorted order is read through a descriptor built on the device per program, over
its expert's rows only: the copy engine zero-fills the rows past the expert's end, as the
masked pointer loads do, and the descriptor frees the address registers (206 -> 169 a thread
in sm_90 ptxas's report for dW_down). The ``dW[e]`` tile is stored through a host-built
``[E', K, N]`` descriptor, which clips at ``K`` and ``N``. The gathered operand keeps its pointer
loads (Hopper's TMA has no row gather).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moeflux.ops.dispatch import DispatchPlan
from moeflux.ops.grouped_matmul.triton import _dot, _ensure_descriptor_allocator, _has_copy_engine, _input_precision

ROW_ORDERS = ("sorted", "tokens", "pairs")


@dataclass(frozen=True)
class WeightGradConfig:
    """Launch parameters of the weight-gradient kernel.

    Attributes:
        block_k: rows of the ``dW[e]`` tile (the width of ``a``).
        block_n: columns of the ``dW[e]`` tile (the width of ``b``).
        block_m: sorted rows per step of the reduction loop.
        num_warps: warps per program.
        num_stages: software-pipeline depth of the row loop (buffers of operand copies).
        prefetch_rows: load each step's pair ids one step ahead (see the module docstring);
            off is the former main loop, kept for comparison.
        prescale: with a ``row_scale``, first write a scaled copy of a ``"sorted"`` or
            ``"pairs"`` operand (``a``, else ``b``) in one elementwise pass (``P x width``
            extra memory for the call), then run the unscaled kernel; off (or with two
            ``"tokens"`` operands) the kernel scales ``a`` in registers each step. Scaling
            ``a`` either way gives equal bits.
        sorted_tma: load an operand in sorted order (``"sorted"`` rows, or the scaled copy of
            ``prescale``) through a TMA descriptor built on the device over its expert's rows,
            so the copy engine zero-fills past the expert's end (GPUs with TMA; pointer loads
            otherwise or when the layout does not allow it).
        out_tma: store the ``dW[e]`` tiles through a TMA descriptor of ``out`` (unit stride
            along ``N`` or ``K``, 16-byte aligned otherwise; a pointer store else).
    """

    block_k: int = 128
    block_n: int = 256
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 4
    prefetch_rows: bool = True
    prescale: bool = True
    sorted_tma: bool = False
    out_tma: bool = False


# Mean rows per expert from which the 128 x 256 tile is taken (16-bit dtypes).
WIDE_TILE_MIN_ROWS = 512


def long_row_loops(dtype: torch.dtype, rows_per_expert: float | None) -> bool:
    """16-bit operands and at least :data:`WIDE_TILE_MIN_ROWS` rows an expert (unknown counts
    as long): the regime of :func:`select_weight_grad_config`'s ``128 x 256`` TMA tiles."""
    return dtype.itemsize <= 2 and (rows_per_expert is None or rows_per_expert >= WIDE_TILE_MIN_ROWS)


@functools.lru_cache(maxsize=256)
def select_weight_grad_config(
    K: int, N: int, dtype: torch.dtype, *, rows_per_expert: float | None = None
) -> WeightGradConfig:
    """A launch config for ``dW[e]`` of ``[K, N]``; ``rows_per_expert`` is the mean length of
    the row loop (``P / E'``; unknown counts as long). A heuristic, not a search.

    * 16-bit dtypes with long row loops (``rows_per_expert >= WIDE_TILE_MIN_ROWS``, e.g. the
      competition's T=8192: 1241): ``128 x 256`` tiles, 8 warps (two warpgroups, 128 fp32
      accumulators a thread), 64-row steps, 3 stages (144 KiB of shared memory: one program
      an SM). A step reads 48 KiB of operands for 4.2 MFLOP where ``128 x 128`` reads 32 KiB
      for 2.1: a third less L2 traffic per FLOP.
    * short row loops (the model prefill shapes, 256-310 rows an expert: 4-5 steps a tile):
      ``128 x 128`` tiles, 4 warps, 3 stages (96 KiB: two programs an SM, so one's pipeline
      fill and store overlap the other's steps).
    * The stage and warp counts are the H100 sweep's picks (``benchmarks/moe_train_gpu.py
      --sweep``, results in ``benchmarks/results/moe-train-h100-2026-11-25-1912553``): 3 stages
      over 4 measured 1.04x on the long loops, 4 warps over 8 1.01-1.06x on the short ones.
    * float32 (twice the bytes a tile): ``128 x 128``, 32-row steps.
    * narrow ``K`` / ``N`` shrink the tile; 8 warps for wide (or float32) ``128 x 128``+ tiles, else 4.
    * ``prescale`` on: a separate pass scales the sorted operand (see :class:`WeightGradConfig`).
    * ``sorted_tma`` and ``out_tma`` with the ``128 x 256`` tiles: on the H100 at the
      competition's T = 8192, dW_gate_up 4.98 -> 4.32 ms, dW_down 2.59 -> 2.61 ms; with the
      short loops of Qwen3 both 8% slower (``--sweep-set tma``, results in
      ``benchmarks/results/moe-train-h100-2026-11-25-8e35977-tma-sweep``).
    """
    element_size = dtype.itemsize
    wide = long_row_loops(dtype, rows_per_expert) and K >= 128 and N >= 256
    block_k = min(128, _at_least_16(K))
    block_n = 256 if wide else min(128, _at_least_16(N))
    block_m = 32 if element_size >= 4 else 64
    num_warps = 8 if block_k * block_n >= 128 * 128 and (wide or element_size >= 4) else 4
    stage_bytes = (block_k + block_n) * block_m * element_size
    if wide:
        num_stages = max(2, min(3, (200 * 1024) // stage_bytes))
    else:
        num_stages = max(2, min(3 if element_size <= 2 else 4, (160 * 1024) // stage_bytes))
    return WeightGradConfig(block_k, block_n, block_m, num_warps, num_stages, sorted_tma=wide, out_tma=wide)


def _at_least_16(size: int) -> int:
    """The next power of two >= ``size``, at least 16 (``tl.dot``'s smallest tile side)."""
    return max(16, triton.next_power_of_2(size))


@triton.jit
def _weight_grad_kernel(
    a_ptr,  # [rows_a, K]: sorted rows, tokens or pairs
    b_ptr,  # [rows_b, N]
    out_ptr,  # [E', K, N]
    row_scale_ptr,  # [P] float32, pair order (SCALE)
    sorted_to_pair_ptr,  # [P] int32
    expert_offsets_ptr,  # [E' + 1] int32
    K,
    N,
    num_experts,
    stride_a_m,
    stride_a_k,
    stride_b_m,
    stride_b_n,
    stride_out_e,
    stride_out_k,
    stride_out_n,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    A_TMA: tl.constexpr,  # a (in sorted order) through a device-built descriptor over the expert's rows
    B_TMA: tl.constexpr,
    OUT_TMA: tl.constexpr,  # out_ptr is a host-built [E', K, N] descriptor ([E', N, K] with OUT_TRANSPOSED)
    OUT_TRANSPOSED: tl.constexpr,  # out is the transposed view of a contiguous [E', N, K]
    A_DIVISOR: tl.constexpr,  # src_a(r) = sorted_to_pair[r] // A_DIVISOR when GATHER_A (k' or 1)
    B_DIVISOR: tl.constexpr,
    SCALE: tl.constexpr,
    PREFETCH_ROWS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no column mask on a
    EVEN_N: tl.constexpr,
    K_FASTEST: tl.constexpr,  # program_id(0) walks K tiles (else N tiles); see the launcher
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if K_FASTEST:
        i_k, i_n = tl.program_id(0), tl.program_id(1)
    else:
        i_n, i_k = tl.program_id(0), tl.program_id(1)
    # Last expert first: the shared experts (every token, the longest row loops) sit last.
    i_e = (num_experts - 1 - tl.program_id(2)).to(tl.int64)
    row_start = tl.load(expert_offsets_ptr + i_e)
    row_end = tl.load(expert_offsets_ptr + i_e + 1)

    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_k = o_k < K
    m_n = o_n < N
    INDEXED: tl.constexpr = GATHER_A or GATHER_B or SCALE
    # Descriptors bounded at the expert's last row: the copy engine zero-fills the rows past
    # it, as the masked pointer loads do (an empty expert's is never read; its extent is 1).
    num_rows = tl.maximum(row_end - row_start, 1)
    if A_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr + row_start.to(tl.int64) * stride_a_m, [num_rows, K],
                                           [stride_a_m, 1], [BLOCK_M, BLOCK_K])  # fmt: skip
    if B_TMA:
        b_desc = tl.make_tensor_descriptor(b_ptr + row_start.to(tl.int64) * stride_b_m, [num_rows, N],
                                           [stride_b_m, 1], [BLOCK_M, BLOCK_N])  # fmt: skip
    b_acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    o_r = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted rows of the step
    if PREFETCH_ROWS:
        if INDEXED:
            o_pair = tl.load(sorted_to_pair_ptr + o_r, mask=o_r < row_end, other=0)
        # A sorted operand's pointers advance BLOCK_M rows a step (no per-row address math);
        # int64 steps (a stride of 1 arrives as a constexpr, hence tl.full rather than .to).
        if not GATHER_A and not A_TMA:
            p_a = a_ptr + o_r[None, :].to(tl.int64) * stride_a_m + o_k[:, None] * stride_a_k
            a_step = tl.full([], BLOCK_M, tl.int64) * stride_a_m
        if not GATHER_B and not B_TMA:
            p_b = b_ptr + o_r[:, None].to(tl.int64) * stride_b_m + o_n[None, :] * stride_b_n
            b_step = tl.full([], BLOCK_M, tl.int64) * stride_b_m
    for m_start in range(row_start, row_end, BLOCK_M):
        if not PREFETCH_ROWS:
            o_r = m_start + tl.arange(0, BLOCK_M)
            if INDEXED:
                o_pair = tl.load(sorted_to_pair_ptr + o_r, mask=o_r < row_end, other=0)
            if not GATHER_A and not A_TMA:
                p_a = a_ptr + o_r[None, :].to(tl.int64) * stride_a_m + o_k[:, None] * stride_a_k
            if not GATHER_B and not B_TMA:
                p_b = b_ptr + o_r[:, None].to(tl.int64) * stride_b_m + o_n[None, :] * stride_b_n
        m_r = o_r < row_end
        if PREFETCH_ROWS and INDEXED:
            # The next step's pair ids, one step ahead: the operand addresses then depend on a
            # loop-carried value, not on a load of the same step, so the pipeliner keeps
            # num_stages - 1 steps of copies in flight (with the id load in the step it spends
            # a stage on it: num_stages 3 and 4 both kept one step in flight, wait-all each step).
            o_r_next = o_r + BLOCK_M
            o_pair_next = tl.load(sorted_to_pair_ptr + o_r_next, mask=o_r_next < row_end, other=0)
        if GATHER_A:
            p_a = a_ptr + (o_pair // A_DIVISOR)[None, :].to(tl.int64) * stride_a_m + o_k[:, None] * stride_a_k
        if GATHER_B:
            p_b = b_ptr + (o_pair // B_DIVISOR)[:, None].to(tl.int64) * stride_b_m + o_n[None, :] * stride_b_n
        # a is read transposed, [BLOCK_K, BLOCK_M] with K contiguous: both operands are
        # MN-major, which wgmma reads from shared memory as copied (no transpose through
        # registers). Rows past the expert's end load zeros in both operands (a zero times a
        # NaN of the next expert's row would still be NaN).
        if A_TMA:
            b_a = a_desc.load([m_start - row_start, i_k * BLOCK_K]).T  # [BLOCK_K, BLOCK_M]
        elif EVEN_K:
            b_a = tl.load(p_a, mask=m_r[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        else:
            b_a = tl.load(p_a, mask=m_k[:, None] & m_r[None, :], other=0.0)
        if SCALE:
            # Scaling a rather than b: on Hopper the left MMA operand may live in registers,
            # the right one must sit in shared memory as loaded.
            b_scale = tl.load(row_scale_ptr + o_pair, mask=m_r, other=0.0)  # [BLOCK_M]
            b_a = (b_a.to(tl.float32) * b_scale[None, :]).to(a_ptr.dtype.element_ty)
        if B_TMA:
            b_b = b_desc.load([m_start - row_start, i_n * BLOCK_N])  # [BLOCK_M, BLOCK_N]
        elif EVEN_N:
            b_b = tl.load(p_b, mask=m_r[:, None], other=0.0)  # [BLOCK_M, BLOCK_N]
        else:
            b_b = tl.load(p_b, mask=m_r[:, None] & m_n[None, :], other=0.0)
        b_acc = _dot(b_a, b_b, b_acc, INPUT_PRECISION, DOT_IN_FP32)
        if PREFETCH_ROWS:
            o_r += BLOCK_M
            if INDEXED:
                o_pair = o_pair_next
            if not GATHER_A and not A_TMA:
                p_a += a_step
            if not GATHER_B and not B_TMA:
                p_b += b_step

    if OUT_TMA and OUT_TRANSPOSED:
        b_out = b_acc.to(out_ptr.dtype).T.reshape(1, BLOCK_N, BLOCK_K)
        out_ptr.store([i_e.to(tl.int32), i_n * BLOCK_N, i_k * BLOCK_K], b_out)
    elif OUT_TMA:
        b_out = b_acc.to(out_ptr.dtype).reshape(1, BLOCK_K, BLOCK_N)
        out_ptr.store([i_e.to(tl.int32), i_k * BLOCK_K, i_n * BLOCK_N], b_out)
    else:
        p_out = out_ptr + i_e * stride_out_e + o_k[:, None].to(tl.int64) * stride_out_k + o_n[None, :] * stride_out_n
        tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_k[:, None] & m_n[None, :])


@triton.jit
def _scale_rows_kernel(
    x_ptr,  # [R, C]
    out_ptr,  # [R, C] contiguous
    row_scale_ptr,  # [P] float32, pair order
    sorted_to_pair_ptr,  # [P] int32
    R,
    C,
    stride_x_r,
    stride_x_c,
    SORTED: tl.constexpr,  # row r scales by row_scale[sorted_to_pair[r]], else row_scale[r]
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[r] = x[r] * s(r)``, rounded to ``x``'s dtype as the weight-gradient kernel's
    ``SCALE`` rounds its scaled operand (the same float32 product and cast: equal bits)."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_r = o_r < R
    m = m_r[:, None] & (o_c < C)[None, :]
    if SORTED:
        o_s = tl.load(sorted_to_pair_ptr + o_r, mask=m_r, other=0)
    else:
        o_s = o_r
    b_scale = tl.load(row_scale_ptr + o_s, mask=m_r, other=0.0)
    b_x = tl.load(x_ptr + o_r[:, None].to(tl.int64) * stride_x_r + o_c[None, :] * stride_x_c, mask=m, other=0.0)
    b_y = (b_x.to(tl.float32) * b_scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + o_r[:, None].to(tl.int64) * C + o_c[None, :], b_y, mask=m)


def _scale_rows(x: torch.Tensor, row_scale: torch.Tensor, plan: DispatchPlan, rows: str) -> torch.Tensor:
    """A scaled copy of a ``"sorted"`` or ``"pairs"`` operand (see ``WeightGradConfig.prescale``)."""
    R, C = x.shape
    out = torch.empty(R, C, device=x.device, dtype=x.dtype)
    if R == 0 or C == 0:
        return out
    block_c = min(1024, _at_least_16(C))
    block_r = max(1, 8192 // block_c)
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, block_c))
    _scale_rows_kernel[grid](
        x, out, row_scale, plan.sorted_to_pair, R, C, x.stride(0), x.stride(1),
        SORTED=rows == "sorted", BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out


def _tma_layout(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through a TMA descriptor: unit stride along its last dimension,
    16-byte aligned start and other strides (size-1 dimensions included: the descriptor holds
    every stride), on a GPU with TMA (or the interpreter)."""
    return (
        x.numel() > 0
        and x.stride(-1) == 1
        and x.data_ptr() % 16 == 0
        and all((stride * x.element_size()) % 16 == 0 for stride in x.stride()[:-1])
        and _has_copy_engine(x.device)
    )


def grouped_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    plan: DispatchPlan,
    *,
    a_rows: str = "sorted",
    b_rows: str = "sorted",
    row_scale: torch.Tensor | None = None,
    config: WeightGradConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW[e] = sum_{r in rows(e)} s(r) a[src_a(r)]^T b[src_b(r)]`` for every expert of ``plan``.

    Args:
        a: ``[rows, K]``; ``T`` rows when ``a_rows == "tokens"``, else ``P``. Any strides.
        b: ``[rows, N]``, likewise for ``b_rows``; ``a``'s dtype (float32 / float16 / bfloat16).
        plan: the dispatch plan (only ``expert_offsets`` and ``sorted_to_pair`` are read).
        a_rows, b_rows: ``"sorted"``, ``"tokens"`` or ``"pairs"`` (see the module docstring).
        row_scale: ``[P]`` float32 in pair order, multiplies each row's outer product.
        config: launch parameters; :func:`select_weight_grad_config` when omitted.
        out: optional preallocated ``[E', K, N]`` in ``a``'s dtype, any strides (e.g. the
            transposed view of a ``[E', N, K]`` weight's gradient); every element is written.

    Returns:
        ``[E', K, N]`` in ``a``'s dtype, accumulated in float32; exact zeros for experts
        with no rows.
    """
    P, top_k, num_experts = plan.num_pairs, plan.top_k, plan.num_experts
    expected_rows = {"sorted": P, "tokens": plan.num_tokens, "pairs": P}
    for name, tensor, rows in (("a", a, a_rows), ("b", b, b_rows)):
        if rows not in ROW_ORDERS:
            raise ValueError(f"{name}_rows must be one of {ROW_ORDERS}, got {rows!r}")
        if tensor.dim() != 2 or tensor.shape[0] != expected_rows[rows]:
            raise ValueError(
                f"{name} must be [{expected_rows[rows]}, .] for {name}_rows={rows!r}, got {list(tensor.shape)}"
            )
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"a and b must share a float32 / float16 / bfloat16 dtype, got {a.dtype} and {b.dtype}")
    if row_scale is not None and (row_scale.shape != (P,) or row_scale.dtype != torch.float32):
        raise ValueError(f"row_scale must be float32 [{P}], got {row_scale.dtype} {list(row_scale.shape)}")
    K, N = a.shape[1], b.shape[1]
    if out is None:
        out = torch.empty(num_experts, K, N, device=a.device, dtype=a.dtype)
    elif out.shape != (num_experts, K, N) or out.dtype != a.dtype:
        raise ValueError(f"out must be {a.dtype} [{num_experts}, {K}, {N}], got {out.dtype} {list(out.shape)}")
    if K == 0 or N == 0:
        return out
    if config is None:
        config = select_weight_grad_config(K, N, a.dtype, rows_per_expert=P / max(num_experts, 1))
    scale = row_scale is not None
    if scale:
        row_scale = row_scale.contiguous()
        if config.prescale and (a_rows != "tokens" or b_rows != "tokens"):
            # One elementwise pass instead of the scaled operand's trip through registers.
            if a_rows != "tokens":
                a = _scale_rows(a, row_scale, plan, a_rows)
            else:
                b = _scale_rows(b, row_scale, plan, b_rows)
            scale = False
    else:
        row_scale = plan.sorted_to_pair  # unused when SCALE is off
    # Programs start in grid order, the first axis fastest: the programs running at one time
    # share a tile row of the slower axis and sweep the faster one, so the faster axis's
    # operand (all of an expert's rows, that axis wide) cycles through L2 once per tile row.
    # Sweep the narrower of K and N: with N fastest, Mixtral's dW_gate_up (K = 4096, N =
    # 28672, 1024 rows an expert) re-read its 58 MB b from HBM for each of 32 tile rows.
    k_fastest = N > K
    num_k_tiles, num_n_tiles = triton.cdiv(K, config.block_k), triton.cdiv(N, config.block_n)
    grid = (num_k_tiles, num_n_tiles, num_experts) if k_fastest else (num_n_tiles, num_k_tiles, num_experts)
    a_tma = config.sorted_tma and a_rows == "sorted" and _tma_layout(a)
    b_tma = config.sorted_tma and b_rows == "sorted" and _tma_layout(b)
    if a_tma or b_tma:
        _ensure_descriptor_allocator()
    # An out with unit stride along N, or along K (the transposed view of a [E', N, K] tensor:
    # dW^T computed into W's layout), stores through a descriptor of that layout.
    out_transposed = out.stride(2) != 1 and out.stride(1) == 1
    stored = out.transpose(1, 2) if out_transposed else out
    out_operand = out
    if config.out_tma and _tma_layout(stored):
        block = [1, config.block_n, config.block_k] if out_transposed else [1, config.block_k, config.block_n]
        out_operand = TensorDescriptor(stored, list(stored.shape), list(stored.stride()), block)
    _weight_grad_kernel[grid](
        a, b, out_operand, row_scale, plan.sorted_to_pair, plan.expert_offsets, K, N, num_experts,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GATHER_A=a_rows != "sorted", GATHER_B=b_rows != "sorted", A_TMA=a_tma, B_TMA=b_tma,
        OUT_TMA=out_operand is not out, OUT_TRANSPOSED=out_transposed,
        A_DIVISOR=top_k if a_rows == "tokens" else 1, B_DIVISOR=top_k if b_rows == "tokens" else 1,
        SCALE=scale, PREFETCH_ROWS=config.prefetch_rows, EVEN_K=K % config.block_k == 0,
        EVEN_N=N % config.block_n == 0, K_FASTEST=k_fastest, INPUT_PRECISION=_input_precision(a.dtype),
        DOT_IN_FP32=a.device.type == "cpu" and a.dtype == torch.bfloat16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
