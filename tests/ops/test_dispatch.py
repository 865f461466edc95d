"""The dispatch plan: exact integer fields against a loop-by-loop construction and against
the invariants documented on :class:`moeflux.ops.dispatch.DispatchPlan`."""

from __future__ import annotations

import pytest
import torch

from moeflux.ops.dispatch import DispatchPlan, build_dispatch_plan, max_tiles, plan_from_sorted_order


def random_ids(T: int, k: int, E: int, seed: int = 0, choices: list[int] | None = None) -> torch.Tensor:
    """``[T, k]`` distinct experts per token, drawn from ``choices`` (default: all ``E``)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(choices if choices is not None else list(range(E)))
    if T == 0:
        return torch.zeros(0, k, dtype=torch.int64)
    picks = torch.stack([torch.randperm(len(pool), generator=generator)[:k] for _ in range(T)])
    return pool[picks]


def reference_plan(expert_ids: torch.Tensor, E: int, S: int, block_m: int) -> dict[str, list[int]]:
    """The plan built with Python loops over the pairs, experts and tiles."""
    T, k = expert_ids.shape
    rows = [ids + list(range(E, E + S)) for ids in expert_ids.tolist()]
    top_k = k + S
    pair_expert = [e for row in rows for e in row]
    sorted_to_pair = [p for e in range(E + S) for p in range(T * top_k) if pair_expert[p] == e]
    tokens_per_expert = [pair_expert.count(e) for e in range(E + S)]
    expert_offsets = [sum(tokens_per_expert[:e]) for e in range(E + S + 1)]
    tile_expert, tile_row_start = [], []
    for e in range(E + S):
        for start in range(expert_offsets[e], expert_offsets[e + 1], block_m):
            tile_expert.append(e)
            tile_row_start.append(start)
    num_tiles = len(tile_expert)
    padding = max_tiles(T * top_k, E + S, block_m) - num_tiles
    pair_to_sorted = [0] * (T * top_k)
    for r, p in enumerate(sorted_to_pair):
        pair_to_sorted[p] = r
    return {
        "tokens_per_expert": tokens_per_expert,
        "expert_offsets": expert_offsets,
        "sorted_to_pair": sorted_to_pair,
        "pair_to_sorted": pair_to_sorted,
        "tile_expert": tile_expert + [-1] * padding,
        "tile_row_start": tile_row_start + [T * top_k] * padding,
        "num_tiles": [num_tiles],
    }


def check_invariants(plan: DispatchPlan, expert_ids: torch.Tensor, E: int, S: int) -> None:
    T, k = expert_ids.shape
    P = T * (k + S)
    assert (plan.num_tokens, plan.top_k, plan.num_experts, plan.num_pairs) == (T, k + S, E + S, P)
    for name in ("tokens_per_expert", "expert_offsets", "sorted_to_pair", "pair_to_sorted", "tile_expert",
                 "tile_row_start", "num_tiles"):  # fmt: skip
        assert getattr(plan, name).dtype == torch.int32, name
    counts, offsets = plan.tokens_per_expert.long(), plan.expert_offsets.long()
    assert counts.shape == (E + S,) and int(counts.sum()) == P
    assert offsets[0] == 0 and offsets[-1] == P and torch.equal(offsets.diff(), counts)
    sorted_to_pair, pair_to_sorted = plan.sorted_to_pair.long(), plan.pair_to_sorted.long()
    assert torch.equal(sorted_to_pair.sort().values, torch.arange(P))
    assert torch.equal(pair_to_sorted[sorted_to_pair], torch.arange(P))
    shared = torch.arange(E, E + S).expand(T, S)
    pair_expert = torch.cat([expert_ids, shared], dim=1).reshape(-1)
    row_expert = torch.repeat_interleave(torch.arange(E + S), counts)
    assert torch.equal(pair_expert[sorted_to_pair], row_expert)
    # Stable: within each expert the pair index increases.
    same_expert = row_expert[1:] == row_expert[:-1]
    assert bool((sorted_to_pair[1:] > sorted_to_pair[:-1])[same_expert].all())

    num_tiles = int(plan.num_tiles)
    assert num_tiles <= plan.max_tiles == max_tiles(P, E + S, plan.block_m)
    covered = torch.zeros(P, dtype=torch.int64)
    for tile in range(num_tiles):
        e, start = int(plan.tile_expert[tile]), int(plan.tile_row_start[tile])
        end = min(start + plan.block_m, int(offsets[e + 1]))
        assert offsets[e] <= start < end and (start - offsets[e]) % plan.block_m == 0  # never straddles experts
        covered[start:end] += 1
    assert bool((covered == 1).all()), "every sorted row lies in exactly one tile"
    assert bool((plan.tile_expert[:num_tiles].diff() >= 0).all())
    assert bool((plan.tile_expert[num_tiles:] == -1).all()) and bool((plan.tile_row_start[num_tiles:] == P).all())


CASES = [
    # (T, k, E, S, block_m, expert choices): what it exercises
    pytest.param(1, 1, 1, 0, 16, None, id="T1-E1"),  # smallest plan: one pair, one tile
    pytest.param(37, 3, 5, 2, 4, None, id="ragged-shared2"),  # partial tiles, two shared slots sorted last
    pytest.param(24, 2, 6, 1, 8, [0, 2, 3], id="empty-experts"),  # experts 1, 4, 5 get no rows and no tiles
    pytest.param(20, 1, 4, 0, 16, [2], id="one-expert-takes-all"),
    pytest.param(9, 4, 4, 0, 4, None, id="k-equals-E"),  # every token visits every expert
    pytest.param(20, 4, 256, 0, 16, None, id="E256"),  # most experts empty; max_tiles bound with E' > P
    pytest.param(0, 2, 4, 1, 16, None, id="T0"),  # no pairs, no tiles
    pytest.param(13, 2, 3, 0, 1, None, id="block_m-1"),  # one row per tile: num_tiles == P, max_tiles == P + E
    pytest.param(13, 2, 3, 1, 128, None, id="block_m-over-P"),  # one tile per non-empty expert
]


@pytest.mark.parametrize("T, k, E, S, block_m, choices", CASES)
def test_plan_matches_loops(T, k, E, S, block_m, choices):
    expert_ids = random_ids(T, k, E, seed=T + k + E, choices=choices)
    plan = build_dispatch_plan(expert_ids, E, num_shared_experts=S, block_m=block_m)
    check_invariants(plan, expert_ids, E, S)
    for name, expected in reference_plan(expert_ids, E, S, block_m).items():
        assert getattr(plan, name).tolist() == expected, name
        # Views of one allocation, each on a 16-byte boundary (vectorised loads in the kernels).
        assert getattr(plan, name).data_ptr() % 16 == 0, name


def test_with_block_m_equals_fresh_build():
    expert_ids = random_ids(37, 3, 5, seed=1)
    plan = build_dispatch_plan(expert_ids, 5, num_shared_experts=1, block_m=64)
    retiled = plan.with_block_m(4)
    fresh = build_dispatch_plan(expert_ids, 5, num_shared_experts=1, block_m=4)
    for name in ("tile_expert", "tile_row_start", "num_tiles", "sorted_to_pair", "expert_offsets"):
        assert torch.equal(getattr(retiled, name), getattr(fresh, name)), name
    assert plan.with_block_m(64) is plan


def test_plan_from_sorted_order_matches_build():
    # Helion's moe_matmul_ogs inputs for top-1 routing describe the same plan.
    expert_ids = random_ids(29, 1, 6, seed=2, choices=[0, 1, 4, 5])
    flat = expert_ids[:, 0]
    counts = torch.bincount(flat, minlength=6)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    order = torch.argsort(flat, stable=True)
    plan = plan_from_sorted_order(counts, offsets, order, top_k=1, block_m=8)
    built = build_dispatch_plan(expert_ids, 6, block_m=8)
    for name in ("tokens_per_expert", "expert_offsets", "sorted_to_pair", "pair_to_sorted", "tile_expert",
                 "tile_row_start", "num_tiles"):  # fmt: skip
        assert torch.equal(getattr(plan, name), getattr(built, name)), name


def test_plan_outputs_are_all_written(monkeypatch):
    """The kernels write every element: buffers start as -7 instead of empty memory.
    (That the build never syncs with the host is checked on the GPU by
    benchmarks/moe_forward_gpu.py under ``torch.cuda.set_sync_debug_mode("error")``.)"""
    import moeflux.ops.dispatch as dispatch

    real_empty = torch.empty
    monkeypatch.setattr(dispatch.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(-7))
    expert_ids = random_ids(37, 3, 5, seed=4)
    plan = build_dispatch_plan(expert_ids, 5, num_shared_experts=2, block_m=16)
    expected = reference_plan(expert_ids, 5, 2, 16)
    for name, values in expected.items():
        assert getattr(plan, name).tolist() == values, name


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        build_dispatch_plan(torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(TypeError):
        build_dispatch_plan(torch.zeros(4, 1), 2)
