"""Property-based tests of the dispatch plan (``moeflux.ops.dispatch``): every integer field
equal, exactly, to a construction with Python loops, and every invariant documented on
:class:`~moeflux.ops.dispatch.DispatchPlan`, on random routings: T from 0, E from 1 to 300
with empty experts, repeated experts within a token, 0-2 shared experts, int32 / int64 and
strided ids, tile heights from 1 to 128. The plan's buffers start poisoned."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from moeflux.ops.dispatch import build_dispatch_plan, plan_bytes, plan_from_sorted_order
from tests.ops.test_dispatch import check_invariants, reference_plan
from tests.properties.support import examples, poisoned_allocations, token_counts

FIELDS = ("tokens_per_expert", "expert_offsets", "sorted_to_pair", "pair_to_sorted", "tile_expert",
          "tile_row_start", "num_tiles")  # fmt: skip


@st.composite
def routings(draw):
    """``(expert_ids [T, k], E, S, block_m)``: ids drawn from a subset of the experts (the
    others stay empty), distinct within a token or not."""
    E = draw(st.one_of(st.integers(1, 9), st.sampled_from([16, 17, 64, 255, 300])))
    T = draw(token_counts)
    k = draw(st.integers(1, min(6, E) if draw(st.booleans()) else 6))
    chosen = draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=min(E, 12), unique=True))
    distinct = k <= len(chosen) and draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    pool = torch.tensor(chosen)
    if distinct:
        picks = [torch.randperm(len(chosen), generator=generator)[:k] for _ in range(T)]
        expert_ids = pool[torch.stack(picks)] if T else torch.zeros(0, k, dtype=torch.int64)
    else:
        expert_ids = pool[torch.randint(0, len(chosen), (T, k), generator=generator)]
    expert_ids = expert_ids.to(draw(st.sampled_from([torch.int64, torch.int32])))
    layout = draw(st.sampled_from(["contiguous", "row-padded", "column-major"]))
    if layout == "row-padded":  # rows further apart than k
        buffer = torch.full((T, k + 3), -7, dtype=expert_ids.dtype)
        buffer[:, :k] = expert_ids
        expert_ids = buffer[:, :k]
    elif layout == "column-major":  # unit stride along tokens, not slots
        expert_ids = expert_ids.t().contiguous().t()
    S = draw(st.integers(0, 2))
    block_m = draw(st.sampled_from([1, 4, 16, 64, 128]))
    return expert_ids, E, S, block_m


@examples(40)
@given(routings())
def test_plan_equals_loop_construction(routing):
    expert_ids, E, S, block_m = routing
    with poisoned_allocations():
        plan = build_dispatch_plan(expert_ids, E, num_shared_experts=S, block_m=block_m)
    expected = reference_plan(expert_ids.long(), E, S, block_m)
    for name in FIELDS:
        assert getattr(plan, name).tolist() == expected[name], name
    check_invariants(plan, expert_ids.long(), E, S)
    # The memory estimate covers every tensor the plan keeps; its default (block_m = 16)
    # bounds the plans of every block_m >= 16, all that select_config picks.
    kept = sum(getattr(plan, name).numel() * 4 for name in FIELDS)
    peak, bound = plan_bytes(*expert_ids.shape, E, S, block_m=min(block_m, 16))
    assert kept <= bound <= peak


@examples(20)
@given(routings(), st.sampled_from([1, 16, 32, 128]))
def test_retiled_and_presorted_plans_equal_a_fresh_build(routing, other_block_m):
    """``with_block_m`` and ``plan_from_sorted_order`` (a sort done elsewhere) rebuild the
    same plan as ``build_dispatch_plan``."""
    expert_ids, E, S, block_m = routing
    plan = build_dispatch_plan(expert_ids, E, num_shared_experts=S, block_m=block_m)
    with poisoned_allocations():
        retiled = plan.with_block_m(other_block_m)
        presorted = plan_from_sorted_order(
            plan.tokens_per_expert.long(), plan.expert_offsets.long(), plan.sorted_to_pair.long(),
            top_k=plan.top_k, block_m=other_block_m,
        )  # fmt: skip
    fresh = build_dispatch_plan(expert_ids, E, num_shared_experts=S, block_m=other_block_m)
    for name in FIELDS:
        assert torch.equal(getattr(retiled, name), getattr(fresh, name)), name
        assert torch.equal(getattr(presorted, name), getattr(fresh, name)), name
