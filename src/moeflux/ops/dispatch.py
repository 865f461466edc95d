"""The dispatch plan: the routing data of the outer-gather-scatter pattern.

A token ``t`` that chose experts ``expert_ids[t, 0..k-1]`` contributes ``k`` *(token, slot)
pairs*; with ``S`` shared experts folded in, slots ``k .. k+S-1`` hold the shared experts
``E .. E+S-1`` (weight 1), so every token has ``k' = k + S`` pairs and there are ``P = T * k'``
pairs, flat index ``p = t * k' + j``. The grouped GEMMs run over the pairs *sorted by expert*
(stable, so rows of one expert stay in pair order): sorted row ``r`` belongs to expert ``e``
when ``expert_offsets[e] <= r < expert_offsets[e + 1]``.

Everything is built on the tensors' device with no host sync (no ``.item()``, no
data-dependent shapes), so the plan can be captured in a CUDA graph, once the expert-id range
check (``check_ids``, one host read) is turned off. The one host-side size,
``max_tiles``, is an upper bound known from the shapes alone; the true tile count stays on the
device and kernels exit early past it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class DispatchPlan:
    """Where every (token, slot) pair goes, and the GEMM tile schedule over the sorted rows.

    ``E' = num_experts`` (routed + shared), ``k' = top_k`` (slots per token, shared
    included), ``P = num_tokens * top_k``. All tensors live on the routing's device.

    Attributes:
        num_tokens: ``T``.
        top_k: ``k'``, pairs per token (routed slots, then one slot per shared expert).
        num_experts: ``E'``, routed + shared experts.
        block_m: rows per tile of the tile schedule below.
        tokens_per_expert: ``[E']`` int32, pairs routed to each expert; sums to ``P``.
        expert_offsets: ``[E' + 1]`` int32, exclusive prefix sum of ``tokens_per_expert``:
            expert ``e`` owns sorted rows ``expert_offsets[e] : expert_offsets[e + 1]``;
            ``expert_offsets[0] = 0``, ``expert_offsets[E'] = P``.
        sorted_to_pair: ``[P]`` int32, sorted row -> flat pair index ``t * k' + j``; a
            permutation of ``arange(P)``, increasing within each expert's rows (stable sort).
            Its token is ``sorted_to_pair[r] // k'``.
        pair_to_sorted: ``[P]`` int32, the inverse: ``pair_to_sorted[sorted_to_pair] = arange(P)``.
        tile_expert: ``[max_tiles]`` int32, the expert of each tile; tiles of one expert are
            consecutive and in row order, experts in increasing order, empty experts have none.
            Padding tiles (index ``>= num_tiles``) hold ``-1``.
        tile_row_start: ``[max_tiles]`` int32, first sorted row of each tile; the tile covers
            rows ``tile_row_start : min(tile_row_start + block_m, expert_offsets[e + 1])``, so
            a tile never straddles two experts. Padding tiles hold ``P``.
        num_tiles: ``[1]`` int32, the number of real tiles, ``sum_e cdiv(tokens_per_expert[e], block_m)``.
    """

    num_tokens: int
    top_k: int
    num_experts: int
    block_m: int
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_to_pair: torch.Tensor
    pair_to_sorted: torch.Tensor
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor
    num_tiles: torch.Tensor

    @property
    def num_pairs(self) -> int:
        """``P = T * k'``, the rows of the sorted order."""
        return self.num_tokens * self.top_k

    @property
    def max_tiles(self) -> int:
        """Host-known bound on ``num_tiles`` (see :func:`max_tiles`): the grid's M extent."""
        return self.tile_expert.shape[0]

    def with_block_m(self, block_m: int) -> "DispatchPlan":
        """The same plan with its tile schedule rebuilt for ``block_m`` (a few device ops, no sync)."""
        if block_m == self.block_m:
            return self
        tile_expert, tile_row_start, num_tiles = _tile_schedule(
            self.tokens_per_expert, self.expert_offsets, self.num_pairs, block_m
        )
        return dataclasses.replace(
            self, block_m=block_m, tile_expert=tile_expert, tile_row_start=tile_row_start, num_tiles=num_tiles
        )


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the tiles of ``num_pairs`` rows over ``num_experts`` groups.

    ``sum_e cdiv(n_e, B) <= sum_e (n_e // B + [n_e > 0]) <= P // B + min(E', P)``: each
    non-empty expert adds at most one partial tile, and at most ``P`` experts are non-empty.
    """
    return num_pairs // block_m + min(num_experts, num_pairs)


def _sort_blocks(num_pairs: int, total_experts: int) -> tuple[int, int, int]:
    """``(EXPERTS_POW2, BLOCK_P, num_blocks)`` of the counting sort in :func:`build_dispatch_plan`."""
    experts_pow2 = max(16, triton.next_power_of_2(total_experts))
    block_p = max(16, min(256, 8192 // experts_pow2))
    return experts_pow2, block_p, max(1, triton.cdiv(num_pairs, block_p))


def plan_bytes(num_tokens: int, routed_k: int, num_experts: int, num_shared_experts: int = 0, *,
               block_m: int = 16) -> tuple[int, int]:  # fmt: skip
    """``(peak, kept)`` device bytes of :func:`build_dispatch_plan`: ``peak`` while it runs
    (the counting sort's per-block tables included), ``kept`` by the plan it returns. With the
    default ``block_m = 16`` (the smallest tile any config picks) both bound the plan of any
    ``block_m``, and ``kept`` also bounds one re-tiled schedule (:meth:`DispatchPlan.with_block_m`)."""
    top_k = routed_k + num_shared_experts
    total_experts = num_experts + num_shared_experts
    num_pairs = num_tokens * top_k
    experts_pow2, _, num_blocks = _sort_blocks(num_pairs, total_experts)
    sort_tables = 2 * num_blocks * experts_pow2 * 4  # block_counts, block_base
    tile_schedule = 2 * max_tiles(num_pairs, total_experts, block_m) * 4 + 4
    kept = (2 * total_experts + 1) * 4 + 2 * num_pairs * 4 + tile_schedule
    return kept + sort_tables, kept


def check_index_range(ids: torch.Tensor, upper: int, *, name: str, meaning: str) -> None:
    """Raise ``IndexError`` unless every element of ``ids`` lies in ``[0, upper)``.

    One min/max reduction and a copy of two numbers to the host: it synchronises the device,
    so it cannot run inside a CUDA graph capture. ``name`` and ``meaning`` go into the message.
    """
    if ids.numel() == 0:
        return
    lowest, highest = torch.stack(torch.aminmax(ids)).tolist()  # one device-to-host copy
    if lowest < 0 or highest >= upper:
        raise IndexError(f"{name} must lie in [0, {upper}) ({meaning}), found min {lowest} and max {highest}")


def check_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ``IndexError`` unless every id of ``expert_ids`` lies in ``[0, num_experts)`` (a host sync)."""
    check_index_range(expert_ids, num_experts, name="expert_ids", meaning=f"ids of the {num_experts} routed experts")


def build_dispatch_plan(
    expert_ids: torch.Tensor,
    num_experts: int,
    *,
    num_shared_experts: int = 0,
    block_m: int = 64,
    check_ids: bool = True,
) -> DispatchPlan:
    """Sort the (token, slot) pairs of ``expert_ids [T, k]`` by expert and tile them.

    Args:
        expert_ids: ``[T, k]`` integer routed expert ids in ``[0, num_experts)``.
        num_experts: ``E``, routed experts.
        num_shared_experts: ``S``; appends slots ``k .. k+S-1`` holding experts ``E .. E+S-1``
            to every token, so ``E' = E + S`` and ``k' = k + S``.
        block_m: rows per tile of the tile schedule.
        check_ids: verify ``0 <= expert_ids < num_experts`` with one min/max reduction and
            raise ``IndexError`` otherwise (:func:`check_expert_ids`). The check copies two
            numbers to the host, so it synchronises the device: turn it off inside CUDA graphs
            and wherever the ids are known good (router output); an out-of-range id then makes
            the kernels read and write out of bounds.

    Example:
        >>> plan = build_dispatch_plan(torch.tensor([[1, 0], [1, 2]]), 4, block_m=16)
        >>> plan.sorted_to_pair.tolist(), plan.expert_offsets.tolist()
        ([1, 0, 2, 3], [0, 1, 3, 4, 4])
    """
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be [T, k], got shape {list(expert_ids.shape)}")
    if expert_ids.is_floating_point() or expert_ids.is_complex() or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if num_experts < 1 or num_shared_experts < 0 or block_m < 1:
        raise ValueError(
            f"need num_experts >= 1, num_shared_experts >= 0, block_m >= 1; got "
            f"{num_experts}, {num_shared_experts}, {block_m}"
        )
    if check_ids:
        check_expert_ids(expert_ids, num_experts)
    num_tokens, routed_k = expert_ids.shape
    device = expert_ids.device
    top_k = routed_k + num_shared_experts
    total_experts = num_experts + num_shared_experts
    num_pairs = num_tokens * top_k
    expert_ids = expert_ids if expert_ids.stride(1) == 1 else expert_ids.contiguous()

    # A stable counting sort in three launches: per-block histograms, a scan of each
    # expert's column over the blocks, then every pair's rank inside its expert.
    experts_pow2, block_p, num_blocks = _sort_blocks(num_pairs, total_experts)
    block_counts, block_base = _int32_buffers(device, num_blocks * experts_pow2, num_blocks * experts_pow2)
    block_counts, block_base = block_counts.view(num_blocks, experts_pow2), block_base.view(num_blocks, experts_pow2)
    tokens_per_expert, expert_offsets, sorted_to_pair, pair_to_sorted = _int32_buffers(
        device, total_experts, total_experts + 1, num_pairs, num_pairs
    )
    pair_args = dict(ROUTED_K=routed_k, TOP_K=top_k, NUM_ROUTED=num_experts, BLOCK_P=block_p, EXPERTS_POW2=experts_pow2)
    _block_histogram_kernel[(num_blocks,)](expert_ids, block_counts, num_pairs, expert_ids.stride(0), **pair_args)
    _column_scan_kernel[(total_experts,)](
        block_counts, block_base, tokens_per_expert, num_blocks, EXPERTS_POW2=experts_pow2, BLOCK_B=1024
    )
    _place_pairs_kernel[(num_blocks,)](
        expert_ids, block_base, tokens_per_expert, expert_offsets, sorted_to_pair, pair_to_sorted,
        num_pairs, total_experts, expert_ids.stride(0), **pair_args,
    )  # fmt: skip
    tile_expert, tile_row_start, num_tiles = _tile_schedule(tokens_per_expert, expert_offsets, num_pairs, block_m)
    return DispatchPlan(
        num_tokens=num_tokens,
        top_k=top_k,
        num_experts=total_experts,
        block_m=block_m,
        tokens_per_expert=tokens_per_expert,
        expert_offsets=expert_offsets,
        sorted_to_pair=sorted_to_pair,
        pair_to_sorted=pair_to_sorted,
        tile_expert=tile_expert,
        tile_row_start=tile_row_start,
        num_tiles=num_tiles,
    )


def plan_from_sorted_order(
    tokens_per_expert: torch.Tensor,
    expert_offsets: torch.Tensor,
    sorted_to_pair: torch.Tensor,
    *,
    top_k: int = 1,
    block_m: int = 64,
) -> DispatchPlan:
    """A plan from a sort done elsewhere (the inputs of ``moe_matmul_ogs``).

    The three tensors must be consistent (``expert_offsets`` the exclusive prefix sum of
    ``tokens_per_expert``, ``sorted_to_pair`` a permutation of the ``T * top_k`` pairs sorted
    by expert); this is not checked, since checking would sync with the host.
    """
    num_pairs = sorted_to_pair.shape[0]
    if num_pairs % top_k != 0:
        raise ValueError(f"{num_pairs} sorted rows are not a whole number of tokens of top_k={top_k}")
    if expert_offsets.shape[0] != tokens_per_expert.shape[0] + 1:
        raise ValueError(
            f"expert_offsets must have one more entry than tokens_per_expert, got "
            f"{expert_offsets.shape[0]} and {tokens_per_expert.shape[0]}"
        )
    device = sorted_to_pair.device
    sorted_to_pair = sorted_to_pair.to(torch.int32)
    tokens_per_expert = tokens_per_expert.to(torch.int32)
    expert_offsets = expert_offsets.to(torch.int32)
    pair_to_sorted = torch.empty(num_pairs, device=device, dtype=torch.int32)
    pair_to_sorted.scatter_(0, sorted_to_pair.long(), torch.arange(num_pairs, device=device, dtype=torch.int32))
    tile_expert, tile_row_start, num_tiles = _tile_schedule(tokens_per_expert, expert_offsets, num_pairs, block_m)
    return DispatchPlan(
        num_tokens=num_pairs // top_k,
        top_k=top_k,
        num_experts=tokens_per_expert.shape[0],
        block_m=block_m,
        tokens_per_expert=tokens_per_expert,
        expert_offsets=expert_offsets,
        sorted_to_pair=sorted_to_pair,
        pair_to_sorted=pair_to_sorted,
        tile_expert=tile_expert,
        tile_row_start=tile_row_start,
        num_tiles=num_tiles,
    )


def _int32_buffers(device: torch.device, *sizes: int) -> list[torch.Tensor]:
    """Uninitialised int32 tensors of ``sizes``, views of one allocation (one allocator call
    rather than one each: the plan is rebuilt every step, and its host time shows in small
    ones), each starting on a 16-byte boundary so the kernels' loads stay vectorised."""
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += -(-size // 4) * 4
    storage = torch.empty(total, device=device, dtype=torch.int32)
    return [storage[start : start + size] for start, size in zip(starts, sizes)]


def _tile_schedule(
    tokens_per_expert: torch.Tensor, expert_offsets: torch.Tensor, num_pairs: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tile_expert, tile_row_start, num_tiles)`` for ``block_m`` (see :class:`DispatchPlan`)."""
    device = tokens_per_expert.device
    num_experts = tokens_per_expert.shape[0]
    total_tiles = max_tiles(num_pairs, num_experts, block_m)
    tile_expert, tile_row_start, num_tiles = _int32_buffers(device, total_tiles, total_tiles, 1)
    experts_pow2 = max(16, triton.next_power_of_2(num_experts))
    block_tiles = max(16, min(128, 8192 // experts_pow2))
    # One program a block of tiles, each redoing the (tiny) scan over the experts: a single
    # program walking every block took 24 us at Qwen3's 128 experts on the H100.
    _tile_schedule_kernel[(max(1, triton.cdiv(total_tiles, block_tiles)),)](  # num_tiles written even when 0
        tokens_per_expert, expert_offsets, tile_expert, tile_row_start, num_tiles,
        num_experts, num_pairs, total_tiles,
        BLOCK_M=block_m, EXPERTS_POW2=experts_pow2, BLOCK_TILES=block_tiles,
    )  # fmt: skip
    return tile_expert, tile_row_start, num_tiles


@triton.jit
def _pair_experts(expert_ids_ptr, o_p, m_p, stride_ids_t, ROUTED_K: tl.constexpr, TOP_K: tl.constexpr,
                  NUM_ROUTED: tl.constexpr):  # fmt: skip
    """Expert of each flat pair ``p = t * TOP_K + j``: routed slots read ``expert_ids``, the
    slots after them are the shared experts ``NUM_ROUTED + (j - ROUTED_K)``."""
    o_t = (o_p // TOP_K).to(tl.int64)
    o_j = o_p % TOP_K
    m_routed = m_p & (o_j < ROUTED_K)
    b_routed = tl.load(expert_ids_ptr + o_t * stride_ids_t + o_j, mask=m_routed, other=0).to(tl.int32)
    return tl.where(o_j < ROUTED_K, b_routed, NUM_ROUTED + o_j - ROUTED_K)


@triton.jit
def _block_histogram_kernel(
    expert_ids_ptr,  # [T, ROUTED_K] integer
    block_counts_ptr,  # [num_blocks, EXPERTS_POW2] int32: pairs of each expert in each block
    P,
    stride_ids_t,
    ROUTED_K: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_ROUTED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_p = i_b * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    b_expert = _pair_experts(expert_ids_ptr, o_p, m_p, stride_ids_t, ROUTED_K, TOP_K, NUM_ROUTED)  # [BLOCK_P]
    o_e = tl.arange(0, EXPERTS_POW2)
    b_one_hot = (b_expert[:, None] == o_e[None, :]) & m_p[:, None]  # [BLOCK_P, EXPERTS_POW2]
    tl.store(block_counts_ptr + i_b * EXPERTS_POW2 + o_e, tl.sum(b_one_hot.to(tl.int32), axis=0))


@triton.jit
def _column_scan_kernel(
    block_counts_ptr,  # [num_blocks, EXPERTS_POW2] int32
    block_base_ptr,  # [num_blocks, EXPERTS_POW2] int32: pairs of this expert in earlier blocks
    tokens_per_expert_ptr,  # [E'] int32
    num_blocks,
    EXPERTS_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    i_e = tl.program_id(0)
    carry = 0
    for b_start in range(0, num_blocks, BLOCK_B):
        o_b = b_start + tl.arange(0, BLOCK_B)
        m_b = o_b < num_blocks
        b_count = tl.load(block_counts_ptr + o_b * EXPERTS_POW2 + i_e, mask=m_b, other=0)
        b_inclusive = tl.cumsum(b_count, axis=0)
        tl.store(block_base_ptr + o_b * EXPERTS_POW2 + i_e, carry + b_inclusive - b_count, mask=m_b)
        carry += tl.sum(b_count, axis=0)
    tl.store(tokens_per_expert_ptr + i_e, carry)


@triton.jit
def _place_pairs_kernel(
    expert_ids_ptr,  # [T, ROUTED_K] integer
    block_base_ptr,  # [num_blocks, EXPERTS_POW2] int32
    tokens_per_expert_ptr,  # [E'] int32
    expert_offsets_ptr,  # [E' + 1] int32, written by program 0
    sorted_to_pair_ptr,  # [P] int32
    pair_to_sorted_ptr,  # [P] int32
    P,
    num_experts,
    stride_ids_t,
    ROUTED_K: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_ROUTED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
):
    i_b = tl.program_id(0)
    o_e = tl.arange(0, EXPERTS_POW2)
    b_counts = tl.load(tokens_per_expert_ptr + o_e, mask=o_e < num_experts, other=0)
    b_starts = tl.cumsum(b_counts, axis=0) - b_counts  # [EXPERTS_POW2], exclusive
    if i_b == 0:
        tl.store(expert_offsets_ptr + o_e, b_starts, mask=o_e < num_experts)
        tl.store(expert_offsets_ptr + num_experts, P)

    o_p = i_b * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P
    b_expert = _pair_experts(expert_ids_ptr, o_p, m_p, stride_ids_t, ROUTED_K, TOP_K, NUM_ROUTED)
    b_one_hot = ((b_expert[:, None] == o_e[None, :]) & m_p[:, None]).to(tl.int32)  # [BLOCK_P, EXPERTS_POW2]
    # Earlier pairs of the same expert in this block, then in earlier blocks, then earlier experts.
    b_rank_in_block = tl.sum(b_one_hot * (tl.cumsum(b_one_hot, axis=0) - 1), axis=1)
    b_base = tl.load(block_base_ptr + i_b * EXPERTS_POW2 + o_e)
    b_sorted = b_rank_in_block + tl.sum(b_one_hot * (b_base + b_starts)[None, :], axis=1)  # [BLOCK_P]
    tl.store(sorted_to_pair_ptr + b_sorted, o_p, mask=m_p)
    tl.store(pair_to_sorted_ptr + o_p, b_sorted, mask=m_p)


@triton.jit
def _tile_schedule_kernel(
    tokens_per_expert_ptr,  # [E'] int32
    expert_offsets_ptr,  # [E' + 1] int32
    tile_expert_ptr,  # [max_tiles] int32
    tile_row_start_ptr,  # [max_tiles] int32
    num_tiles_ptr,  # [1] int32
    num_experts,
    P,
    max_tiles,
    BLOCK_M: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
):
    o_e = tl.arange(0, EXPERTS_POW2)
    m_e = o_e < num_experts
    b_tiles = (tl.load(tokens_per_expert_ptr + o_e, mask=m_e, other=0) + BLOCK_M - 1) // BLOCK_M
    b_tile_ends = tl.cumsum(b_tiles, axis=0)  # [EXPERTS_POW2], inclusive
    b_first_rows = tl.load(expert_offsets_ptr + o_e, mask=m_e, other=0)
    total = tl.sum(b_tiles, axis=0)
    i_block = tl.program_id(0)
    if i_block == 0:
        tl.store(num_tiles_ptr, total)
    o_i = i_block * BLOCK_TILES + tl.arange(0, BLOCK_TILES)
    # Tile i belongs to the first expert whose tiles end past i (empty experts end where
    # their predecessor does, so they own no tile).
    b_owned = ((b_tile_ends[None, :] > o_i[:, None]) & ((b_tile_ends - b_tiles)[None, :] <= o_i[:, None]))
    b_owned = (b_owned & m_e[None, :]).to(tl.int32)  # [BLOCK_TILES, EXPERTS_POW2], one hit per real tile
    b_expert = tl.sum(b_owned * o_e[None, :], axis=1)
    b_tile_in_expert = o_i - tl.sum(b_owned * (b_tile_ends - b_tiles)[None, :], axis=1)
    b_row = tl.sum(b_owned * b_first_rows[None, :], axis=1) + b_tile_in_expert * BLOCK_M
    m_real = o_i < total
    m_i = o_i < max_tiles
    tl.store(tile_expert_ptr + o_i, tl.where(m_real, b_expert, -1), mask=m_i)
    tl.store(tile_row_start_ptr + o_i, tl.where(m_real, b_row, P), mask=m_i)
