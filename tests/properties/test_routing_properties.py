"""Property-based tests of routing (``moeflux.ops.route``), both backends, every rule of
:class:`moeflux.RouterConfig`, against float64 math written here.

Drawn: T from 0, E from 1 to 300, k from 1 to the eligible experts, float32 / float16 /
bfloat16 logits (some tied, some tokens NaN), softmax or sigmoid scores, renormalisation,
softmax after top-k, group-limited top-k, a scaling factor, a correction bias, a capacity.
Checked, exactly where integers: ids in range and distinct per token, ``tokens_per_expert``
their histogram, ``dropped_per_expert`` what the capacity implies; within rounding: the
choice is a valid top-k of the rule (no unchosen eligible expert scores clearly higher; the
chosen best first; groups respected), the weights, scores and logsumexp equal their float64
definitions, and the gradient of the logits equals float64 autograd through them.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from moeflux import RouterConfig
from moeflux.ops.routing import route
from tests.properties.support import examples, float_dtypes, token_counts

# Rounding slack of the choice scores: the kernels rank scores rounded to the logits' dtype.
CHOICE_SLACK = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def routers(draw, num_experts: int) -> RouterConfig:
    divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0 and g <= 8]
    num_groups = draw(st.sampled_from(divisors))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    after = scoring == "softmax" and draw(st.booleans())
    return RouterConfig(
        scoring=scoring,
        normalize_topk=not after and draw(st.booleans()),
        softmax_after_topk=after,
        num_groups=num_groups,
        topk_groups=draw(st.integers(1, num_groups)),
        scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.5])),
        expert_bias=draw(st.booleans()),
        capacity_factor=draw(st.sampled_from([None, None, 0.5, 1.0, 2.0])),
    )


@st.composite
def routings(draw):
    E = draw(st.one_of(st.integers(1, 12), st.sampled_from([16, 64, 300])))
    router = draw(routers(E))
    eligible = router.topk_groups * (E // router.num_groups)
    k = draw(st.integers(1, min(eligible, 8)))
    T, dtype = draw(token_counts), draw(float_dtypes)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = torch.randn(T, E, generator=generator) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    if draw(st.booleans()):  # ties: logits on a coarse grid
        logits = (logits * 2).round() / 2
    nan_tokens = torch.zeros(T, dtype=torch.bool)
    if T > 1 and draw(st.booleans()):
        nan_tokens[draw(st.integers(0, T - 1))] = True
        logits[nan_tokens, 0] = math.nan
    bias = torch.randn(E, generator=generator) * 0.05 if router.expert_bias else None
    return logits.to(dtype), k, router, bias, nan_tokens, generator


def choice_scores64(logits: torch.Tensor, router: RouterConfig, bias: torch.Tensor | None) -> torch.Tensor:
    """The float64 scores the rule ranks: scores (or logits with softmax after top-k) plus the bias."""
    logits64 = logits.double()
    if router.softmax_after_topk:
        choice = logits64
    elif router.scoring == "sigmoid":
        choice = torch.sigmoid(logits64)
    else:
        choice = torch.softmax(logits64, dim=-1)
    return choice if bias is None else choice + bias.double()


def weights64(logits64: torch.Tensor, expert_ids: torch.Tensor, router: RouterConfig, capacity: int | None):
    """Float64 weights of the chosen experts (differentiable in ``logits64``)."""
    scores = torch.sigmoid(logits64) if router.scoring == "sigmoid" else torch.softmax(logits64, dim=-1)
    if router.softmax_after_topk:
        weights = torch.softmax(logits64.gather(1, expert_ids), dim=-1)
    else:
        weights = scores.gather(1, expert_ids)
        if router.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * router.scaling_factor
    if capacity is not None:  # each expert keeps its first `capacity` pairs in flat (t, j) order
        flat = expert_ids.flatten().tolist()
        seen: dict[int, int] = {}
        keep = []
        for e in flat:
            keep.append(seen.get(e, 0) < capacity)
            seen[e] = seen.get(e, 0) + 1
        weights = weights * torch.tensor(keep, dtype=torch.float64).view(expert_ids.shape)
    return weights, scores


def check_valid_choice(logits, expert_ids, router, bias, slack):
    """Every chosen expert is eligible and scores (float64) at least as high as every
    eligible unchosen one, up to the rounding slack; the chosen come best first."""
    T, E = logits.shape
    choice = choice_scores64(logits, router, bias)
    tolerance = slack * (1 + choice.abs())
    eligible = surely_kept = torch.ones(T, E, dtype=torch.bool)
    if router.num_groups > 1:
        group_size = E // router.num_groups
        grouped = choice.view(T, router.num_groups, group_size)
        group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(-1)  # [T, G]
        cutoff = group_scores.sort(dim=-1, descending=True).values[:, router.topk_groups - 1 : router.topk_groups]
        group_tolerance = 2 * slack * (1 + group_scores.abs().max(dim=-1, keepdim=True).values)
        eligible = (group_scores >= cutoff - group_tolerance).repeat_interleave(group_size, dim=1)
        surely_kept = (group_scores > cutoff + group_tolerance).repeat_interleave(group_size, dim=1)
        chosen_groups = expert_ids // group_size
        assert all(len(set(row)) <= router.topk_groups for row in chosen_groups.tolist()), "too many groups"
    assert bool(eligible.gather(1, expert_ids).all()), "an expert of a dropped group was chosen"
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, expert_ids, True)
    worst_chosen = (choice.gather(1, expert_ids) + tolerance.gather(1, expert_ids)).min(dim=1).values
    # (In a group kept or dropped by a near-tie, an unchosen expert may legitimately score higher.)
    unchosen = torch.where(surely_kept & ~chosen, choice, -math.inf)
    assert bool((unchosen.max(dim=1).values <= worst_chosen).all()), "an unchosen expert scores higher"
    ranked = choice.gather(1, expert_ids)
    assert bool((ranked[:, 1:] <= ranked[:, :-1] + tolerance.gather(1, expert_ids)[:, :-1]).all()), "not best first"


@examples(80)
@given(routings(), st.sampled_from(["torch", "triton"]))
def test_routing_matches_float64(case, backend):
    logits, k, router, bias, nan_tokens, generator = case
    T, E = logits.shape
    leaf = logits.clone().requires_grad_()
    routing = route(leaf, k, router=router, expert_bias=bias, backend=backend)
    ids = routing.expert_ids

    # Integers, exactly.
    assert ids.shape == (T, k) and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < E)).all())
    assert all(len(set(row)) == k for row in ids.tolist()), "an expert chosen twice by one token"
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert torch.equal(routing.tokens_per_expert, counts)
    capacity = router.capacity(T, E, k)
    expected_dropped = torch.zeros(E, dtype=torch.int64) if capacity is None else (counts - capacity).clamp_min(0)
    assert torch.equal(routing.dropped_per_expert, expected_dropped)

    fine = ~nan_tokens
    assume(T == 0 or bool(fine.any()))
    check_valid_choice(logits[fine], ids[fine], router, None if bias is None else bias, CHOICE_SLACK[logits.dtype])

    # Floats, against their float64 definitions on the chosen ids (NaN tokens: NaN scores).
    logits64 = logits.double().requires_grad_()
    expected_weights, expected_scores = weights64(logits64, ids, router, capacity)
    assert torch.allclose(routing.expert_weights[fine].double(), expected_weights[fine], rtol=1e-5, atol=1e-6)
    assert torch.allclose(routing.router_probs[fine].double(), expected_scores[fine], rtol=1e-5, atol=1e-7)
    if router.scoring == "softmax":  # a NaN logit spoils its token's softmax; a sigmoid, its own score
        assert bool(routing.router_probs[nan_tokens].isnan().all()), "a NaN token's scores are not NaN"
    else:
        assert torch.equal(routing.router_probs.isnan(), logits.isnan())
    expected_lse = torch.logsumexp(logits64, dim=-1)
    assert torch.allclose(routing.logsumexp[fine].double(), expected_lse[fine], rtol=1e-5, atol=1e-5)

    # The gradient through weights, scores and logsumexp (the auxiliary losses read the latter).
    if T == 0 or not bool(fine.all()):
        return
    g_weights = torch.randn(T, k, generator=generator)
    g_scores = torch.randn(T, E, generator=generator)
    g_lse = torch.randn(T, generator=generator)
    loss = (routing.expert_weights * g_weights).sum() + (routing.router_probs * g_scores).sum()
    (loss + (routing.logsumexp * g_lse).sum()).backward()
    loss64 = (expected_weights * g_weights.double()).sum() + (expected_scores * g_scores.double()).sum()
    (loss64 + (expected_lse * g_lse.double()).sum()).backward()
    scale = float(logits64.grad.abs().max()) + 1.0  # the gradient comes back in the logits' dtype
    assert float((leaf.grad.double() - logits64.grad).abs().max()) <= GRAD_TOLERANCE[logits.dtype] * scale
