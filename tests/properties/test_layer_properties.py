"""Property-based tests: the layer (``moeflux.moe``) on random shapes, dtypes, strides and
routing rules (:class:`moeflux.RouterConfig`: softmax / sigmoid, renormalisation, softmax
after top-k, group-limited top-k, scaling, correction bias, capacity, jitter outside
training), both backends (Triton through the interpreter on the CPU), against the float64
reference of ``tests/reference.py``.

Checked: the output has the input's shape and dtype and no NaN (the input has none); the
aux data is consistent (ids in range, a valid top-k of the rule, counts their histogram);
the output equals the float64 MoE for the chosen experts with the rule's float64 weights,
within a rounding bound relative to the size of the terms (see ``test_experts_properties``).

Profiles: ``ci`` (default; derandomised, a fixed number of examples) and ``long`` (run by
hand: ``HYPOTHESIS_PROFILE=long python3 -m pytest tests/properties``); see
:mod:`tests.properties.support`.
"""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import moeflux
from tests.properties.support import examples
from tests.properties.test_routing_properties import CHOICE_SLACK, check_valid_choice, routers, weights64
from tests.reference import moe64

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@st.composite
def layers(draw):
    num_experts = draw(st.one_of(st.integers(1, 12), st.sampled_from([31, 64, 300])))
    router = draw(routers(num_experts))
    if draw(st.booleans()):  # ignored outside training
        router = moeflux.RouterConfig(**{**router.__dict__, "jitter": 0.3})
    eligible = router.topk_groups * (num_experts // router.num_groups)
    top_k = draw(st.one_of(st.integers(1, min(eligible, 4)), st.just(eligible if eligible <= 12 else 1)))
    return {
        "T": draw(st.sampled_from([0, 1, 2, 3, 5, 8, 13])),
        "H": draw(st.integers(1, 40)),
        "D": draw(st.integers(1, 24)),
        "E": num_experts,
        "k": top_k,
        "S": draw(st.integers(0, 2)),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        "router": router,
        "strided": draw(st.booleans()),
        "backend": draw(st.sampled_from(["torch", "triton"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@examples(40)
@given(layers())
def test_layer_matches_float64_reference(case):
    torch.manual_seed(case["seed"])
    T, H, E, k, S, dtype, router = (case[key] for key in ("T", "H", "E", "k", "S", "dtype", "router"))
    config = moeflux.MoEConfig(hidden_size=H, expert_size=case["D"], num_experts=E, top_k=k, num_shared_experts=S,
                               router=router)  # fmt: skip
    weights = moeflux.MoEWeights.random(config, dtype=dtype)
    if router.expert_bias:
        weights.expert_bias.normal_(0.0, 0.05)
    x = torch.randn(T, 2 * H).to(dtype)
    x = x[:, ::2] if case["strided"] else x[:, :H].contiguous()

    out, aux = moeflux.moe(x, weights, k, router=router, backend=case["backend"])

    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.isnan(out).any()
    ids = aux.expert_ids
    assert ids.shape == (T, k)
    assert ((ids >= 0) & (ids < E)).all()
    assert torch.equal(aux.tokens_per_expert, torch.bincount(ids.flatten(), minlength=E))
    if T == 0:
        return
    logits = F.linear(x, weights.router)  # the layer's logits, in x's dtype
    check_valid_choice(logits, ids, router, weights.expert_bias, CHOICE_SLACK[dtype])
    chosen, _ = weights64(logits.double(), ids, router, router.capacity(T, E, k))
    expected = moe64(x, weights.router, weights.gate_up, weights.down, ids, chosen, S)
    scale = moe64(x.abs(), weights.router, weights.gate_up.abs(), weights.down.abs(), ids, chosen.abs(), S)
    error = float((out.double() - expected).norm())
    assert error <= TOLERANCE[dtype] * float(scale.norm()), (error, float(scale.norm()))
