"""Routing: every variant of RouterConfig against a float64 reference written from its
model's published formula, and the Triton kernel against the torch path (forward and
gradient to the logits)."""

import pytest
import torch

from moeflux import RouterConfig
from moeflux.ops.routing import route
from tests.reference import softmax64

SEED = RouterConfig()
MIXTRAL = RouterConfig(normalize_topk=True)
GPT_OSS = RouterConfig(softmax_after_topk=True)


def deepseek_v3(num_groups: int, topk_groups: int, **overrides) -> RouterConfig:
    options = {"scoring": "sigmoid", "expert_bias": True, "normalize_topk": True, "scaling_factor": 2.5}
    return RouterConfig(num_groups=num_groups, topk_groups=topk_groups, **(options | overrides))


# (what it exercises, T, E, k, router)
CASES = [
    ("seed: one token", 1, 8, 2, SEED),
    ("seed: k = E", 9, 6, 6, SEED),
    ("seed: E = 1", 4, 1, 1, SEED),
    ("seed: E = 300, several token blocks", 5, 300, 4, SEED),
    ("mixtral: E not a power of two", 37, 5, 2, MIXTRAL),
    ("mixtral: k = 1, weight 1", 33, 32, 1, MIXTRAL),
    ("mixtral: k = E", 7, 6, 6, MIXTRAL),
    ("gpt-oss: one token", 1, 8, 4, GPT_OSS),
    ("gpt-oss: E = 128, several token blocks", 70, 128, 4, GPT_OSS),
    ("gpt-oss: E = 1", 3, 1, 1, GPT_OSS),
    ("gpt-oss: bias and scaling", 21, 16, 3, RouterConfig(softmax_after_topk=True, expert_bias=True, scaling_factor=3.0)),
    ("deepseek-v3: 8 groups of 32, keep 4, k = 8", 40, 256, 8, deepseek_v3(8, 4)),
    ("deepseek-v3: groups of 12 (not a power of two)", 10, 96, 6, deepseek_v3(8, 3)),
    ("deepseek-v3: groups of one, k = kept groups", 20, 6, 3, deepseek_v3(6, 3)),
    ("deepseek-v3: one group kept, k = its size", 17, 12, 4, deepseek_v3(3, 1)),
    ("deepseek-v3: every group kept, k = E", 9, 8, 8, deepseek_v3(2, 2)),
    ("deepseek-v3: E = 1", 2, 1, 1, deepseek_v3(1, 1)),
    ("sigmoid: no bias, no renormalisation, scaled", 25, 10, 3, RouterConfig(scoring="sigmoid", scaling_factor=1.5)),
    ("sigmoid: bias, no groups", 19, 7, 2, RouterConfig(scoring="sigmoid", expert_bias=True)),
    ("softmax: groups and bias", 30, 16, 4, RouterConfig(num_groups=4, topk_groups=2, expert_bias=True, normalize_topk=True)),
]


def _inputs(T: int, E: int, router: RouterConfig, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(T, E, generator=generator)).to(dtype)
    bias = 0.3 * torch.randn(E, generator=generator) if router.expert_bias else None
    return logits, bias


# ---- float64 references, from the published formulas --------------------------------------


def seed_reference(logits, k):
    """The competition's rule: softmax, top-k, the chosen probabilities as weights."""
    probs = softmax64(logits)
    weights, ids = probs.topk(k, dim=-1)
    return ids, weights


def mixtral_reference(logits, k):
    """Mixtral (and Qwen2/3-MoE with norm_topk_prob, OLMoE): softmax, top-k, renormalise."""
    probs = softmax64(logits)
    weights, ids = probs.topk(k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def gpt_oss_reference(logits, k):
    """gpt-oss: top-k on the logits, then softmax over the k chosen logits."""
    values, ids = logits.double().topk(k, dim=-1)
    return ids, torch.softmax(values, dim=-1)


def deepseek_v3_reference(logits, bias, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, scoring="sigmoid"):
    """DeepSeek-V3's MoEGate: scores = sigmoid(logits); choice = scores + e_score_correction_bias;
    group score = sum of the top-2 choice scores of each group; keep topk_group groups; top-k
    among their experts on choice scores; weights = the un-biased scores of the chosen experts,
    normalised if norm_topk_prob, times routed_scaling_factor."""
    logits = logits.double()
    scores = logits.sigmoid() if scoring == "sigmoid" else torch.softmax(logits, -1)
    choice = scores + (0 if bias is None else bias.double())
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    group_idx = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, group_idx, True)
    score_mask = group_mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    ids = choice.masked_fill(~score_mask, float("-inf")).topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * routed_scaling_factor


def reference(logits, bias, k, router: RouterConfig):
    if router.softmax_after_topk:
        assert bias is None and router.scaling_factor == 1.0, "no published formula for this combination"
        return gpt_oss_reference(logits, k)
    if router.scoring == "sigmoid" or router.num_groups > 1 or bias is not None:
        return deepseek_v3_reference(
            logits, bias, k, router.num_groups, router.topk_groups, router.normalize_topk, router.scaling_factor,
            scoring=router.scoring,
        )  # fmt: skip
    assert router.scaling_factor == 1.0
    return mixtral_reference(logits, k) if router.normalize_topk else seed_reference(logits, k)


REFERENCE_CASES = [case for case in CASES if not (case[4].softmax_after_topk and case[4].expert_bias)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_routing_matches_published_formula(case, backend):
    _, T, E, k, router = case
    logits, bias = _inputs(T, E, router)
    r = route(logits, k, router=router, expert_bias=bias, backend=backend)
    ids64, weights64 = reference(logits, bias, k, router)
    assert torch.equal(r.expert_ids, ids64)
    torch.testing.assert_close(r.expert_weights.double(), weights64, rtol=1e-5, atol=1e-7)
    scores64 = logits.double().sigmoid() if router.scoring == "sigmoid" else softmax64(logits)
    torch.testing.assert_close(r.router_probs.double(), scores64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.logsumexp.double(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=1e-6)
    assert torch.equal(r.tokens_per_expert, torch.bincount(ids64.flatten(), minlength=E))
    assert r.dropped_per_expert.tolist() == [0] * E


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_routing_matches_torch(case, dtype):
    _, T, E, k, router = case
    logits, bias = _inputs(T, E, router, dtype)
    expected = route(logits, k, router=router, expert_bias=bias, backend="torch")
    actual = route(logits, k, router=router, expert_bias=bias, backend="triton")
    assert torch.equal(actual.expert_ids, expected.expert_ids)
    assert torch.equal(actual.tokens_per_expert, expected.tokens_per_expert)
    assert actual.tokens_per_expert.dtype == torch.int64 and actual.expert_ids.dtype == torch.int64
    assert int(actual.tokens_per_expert.sum()) == T * k
    torch.testing.assert_close(actual.router_probs, expected.router_probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(actual.expert_weights, expected.expert_weights, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(actual.logsumexp, expected.logsumexp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_routing_backward_matches_torch(case):
    _, T, E, k, router = case
    logits, bias = _inputs(T, E, router)
    generator = torch.Generator().manual_seed(1)
    g_probs, g_weights, g_lse = (torch.randn(*s, generator=generator) for s in ((T, E), (T, k), (T,)))
    grads = {}
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        r = route(leaf, k, router=router, expert_bias=bias, backend=backend)
        ((r.router_probs * g_probs).sum() + (r.expert_weights * g_weights).sum() + (r.logsumexp * g_lse).sum()).backward()
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] <= 16], ids=[c[0] for c in CASES if c[2] <= 16])
def test_torch_routing_gradients_by_finite_differences(case):
    """The torch path's autograd (the oracle of the Triton backward) against float64 finite differences."""
    _, T, E, k, router = case
    logits, bias = _inputs(min(T, 6), E, router, torch.float64)

    def outputs(leaf):
        r = route(leaf, k, router=router, expert_bias=bias, backend="torch")
        return r.router_probs, r.expert_weights, r.logsumexp

    assert torch.autograd.gradcheck(outputs, (logits.requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_routing_against_float64(backend):
    logits = 3 * torch.randn(50, 12)
    r = route(logits, 3, backend=backend)
    probs64 = softmax64(logits)
    assert torch.allclose(r.router_probs.double(), probs64, atol=1e-7)
    assert torch.equal(r.expert_ids, probs64.topk(3, dim=1).indices)
    assert torch.allclose(r.logsumexp.double(), torch.logsumexp(logits.double(), 1), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_go_to_the_lower_expert_id(backend):
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    r = route(logits, 2, backend=backend)
    assert r.expert_ids.tolist() == [[1, 2], [0, 1]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_ties_go_to_the_lower_group_id(backend):
    # Four groups of two, every group score 2 * sigmoid(0) = 1: groups 0 and 1 are kept, so
    # experts 0..3 are the candidates however the bias ranks the others.
    router = RouterConfig(scoring="sigmoid", num_groups=4, topk_groups=2, expert_bias=True)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 1.0, -1.0])
    r = route(torch.zeros(1, 8), 4, router=router, expert_bias=bias, backend=backend)
    assert r.expert_ids.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_chooses_but_does_not_weight(backend):
    router = RouterConfig(scoring="sigmoid", expert_bias=True)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    r = route(logits, 2, router=router, expert_bias=bias, backend=backend)
    assert r.expert_ids.tolist() == [[3, 0]]  # the bias lifts expert 3 to the top
    torch.testing.assert_close(r.expert_weights, torch.sigmoid(logits[:, [3, 0]]))  # its weight is unbiased
    # A group of one weak expert loses to a group of two middling ones: groups score by their top 2.
    grouped = RouterConfig(scoring="sigmoid", num_groups=2, topk_groups=1)
    r = route(torch.tensor([[4.0, -9.0, 1.0, 1.0]]), 1, router=grouped, backend=backend)
    assert r.expert_ids.tolist() == [[2]]  # sigmoid(4) + sigmoid(-9) = 0.98 < 2 * sigmoid(1) = 1.46


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ranking_uses_probabilities_rounded_to_the_input_dtype(backend):
    # Experts 0 and 2 differ by less than half a bfloat16 ulp of their probability: in
    # bfloat16 they tie, so the lower id wins even though expert 2 is larger in float32.
    logits = torch.tensor([[0.0, -4.0, 2.0**-9, -4.0, -1.0]], dtype=torch.bfloat16)
    probs = torch.softmax(logits.float(), -1)
    assert probs[0, 2] > probs[0, 0] and probs[0, 2].bfloat16() == probs[0, 0].bfloat16()
    assert route(logits, 1, backend=backend).expert_ids.tolist() == [[0]]


NONFINITE_ROUTERS = [SEED, GPT_OSS, deepseek_v3(4, 2), RouterConfig(num_groups=2, topk_groups=1)]


@pytest.mark.parametrize("router", NONFINITE_ROUTERS, ids=["seed", "gpt-oss", "deepseek-v3", "softmax groups"])
def test_nonfinite_logits_keep_valid_distinct_ids(router):
    """NaN and -inf logits: ids stay distinct and in range, the same on both backends."""
    logits, bias = _inputs(5, 8, router)
    logits[1] = float("nan")
    logits[2, :6] = float("-inf")
    logits[3, 2] = float("nan")
    results = [route(logits, 3, router=router, expert_bias=bias, backend=b) for b in ("torch", "triton")]
    for r in results:
        assert ((r.expert_ids >= 0) & (r.expert_ids < 8)).all()
        assert all(len(set(row)) == 3 for row in r.expert_ids.tolist())
        assert int(r.tokens_per_expert.sum()) == 15
    assert torch.equal(results[0].expert_ids, results[1].expert_ids)
    torch.testing.assert_close(results[0].expert_weights, results[1].expert_weights, equal_nan=True)


def _capacity_reference(expert_ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[T, k]`` bool kept: each expert keeps its first ``capacity`` pairs, token by token."""
    seen: dict[int, int] = {}
    kept = torch.zeros(expert_ids.shape, dtype=torch.bool)
    for t in range(expert_ids.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            kept[t, j] = seen.get(e, 0) < capacity
            seen[e] = seen.get(e, 0) + 1
    return kept


# (what it exercises, T, E, k, capacity_factor, expected capacity)
CAPACITY_CASES = [
    ("Switch top-1, factor 1", 40, 4, 1, 1.0, 10),
    ("top-2, factor 1.25, capacity rounds up", 30, 8, 2, 1.25, 10),
    ("tight: factor 0.1, capacity 1", 12, 6, 3, 0.1, 1),
    ("roomy: nothing dropped", 16, 4, 2, 4.0, 32),
    ("one token", 1, 8, 2, 1.0, 1),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CAPACITY_CASES, ids=[c[0] for c in CAPACITY_CASES])
def test_capacity_drops_the_latest_tokens(case, backend):
    _, T, E, k, factor, capacity = case
    router = RouterConfig(capacity_factor=factor)
    assert router.capacity(T, E, k) == capacity
    logits = torch.randn(T, E) + torch.linspace(0, 2, E)  # skewed: the last experts overflow
    full = route(logits, k, backend=backend)
    r = route(logits, k, router=router, backend=backend)
    kept = _capacity_reference(r.expert_ids, capacity)
    assert torch.equal(r.expert_ids, full.expert_ids) and torch.equal(r.tokens_per_expert, full.tokens_per_expert)
    assert torch.equal(r.expert_weights, torch.where(kept, full.expert_weights, 0.0))
    dropped = torch.bincount(r.expert_ids[~kept], minlength=E)
    assert torch.equal(r.dropped_per_expert, dropped)
    assert torch.equal(r.dropped_per_expert, (r.tokens_per_expert - capacity).clamp_min(0))
    if factor == 1.0 and k == 1 and T == 40:
        assert int(dropped.sum()) > 0, "the skew should overflow some expert"


def test_capacity_gradient_skips_dropped_pairs():
    router = RouterConfig(capacity_factor=0.5, normalize_topk=True)
    logits = torch.randn(12, 4)
    grads = {}
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        r = route(leaf, 2, router=router, backend=backend)
        r.expert_weights.sum().backward()
        grads[backend] = leaf.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-6)


def test_poisoned_outputs_are_all_written(monkeypatch):
    """Every output element is written: buffers start as NaN / -1 instead of empty memory."""
    import moeflux.ops.routing.triton as routing_triton

    real_empty = torch.empty

    def poisoned_empty(*shape, dtype=None, **kwargs):
        tensor = real_empty(*shape, dtype=dtype, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)

    monkeypatch.setattr(routing_triton.torch, "empty", poisoned_empty)
    for router in (SEED, deepseek_v3(1, 1), GPT_OSS):
        logits, bias = _inputs(67, 11, router)
        r = route(logits, 4, router=router, expert_bias=bias, backend="triton")
        for tensor in (r.router_probs, r.expert_weights, r.logsumexp):
            assert not torch.isnan(tensor).any()
        assert (r.expert_ids >= 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments(backend):
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(3, 4), 5, backend=backend)
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(3, 4), 0, backend=backend)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        route(torch.randn(3, 4, 2), 1, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        route(torch.ones(3, 4, dtype=torch.int32), 1, backend=backend)
    with pytest.raises(ValueError, match="expert_bias"):
        route(torch.randn(3, 4), 1, router=RouterConfig(expert_bias=True), backend=backend)
    with pytest.raises(ValueError, match="divisible"):
        route(torch.randn(3, 6), 1, router=RouterConfig(num_groups=4), backend=backend)
