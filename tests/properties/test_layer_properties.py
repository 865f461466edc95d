"""Property-based tests: the layer on random shapes, dtypes, routing options and strides,
both backends against the float64 reference (Triton through the interpreter on the CPU).

Profiles: ``ci`` (default; derandomised, a fixed number of examples) and ``long`` (run by
hand: ``HYPOTHESIS_PROFILE=long python3 -m pytest tests/properties``).
"""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeflux
from tests.reference import moe64, rel_l2, softmax64

settings.register_profile("ci", max_examples=30, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@st.composite
def layers(draw):
    num_experts = draw(st.one_of(st.integers(1, 12), st.sampled_from([31, 64, 300])))
    top_k = draw(st.one_of(st.integers(1, min(num_experts, 4)), st.just(num_experts if num_experts <= 12 else 1)))
    return {
        "T": draw(st.sampled_from([0, 1, 2, 3, 5, 8, 13])),
        "H": draw(st.integers(1, 40)),
        "D": draw(st.integers(1, 24)),
        "E": num_experts,
        "k": top_k,
        "S": draw(st.integers(0, 2)),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        "normalize": draw(st.booleans()),
        "strided": draw(st.booleans()),
        "backend": draw(st.sampled_from(["torch", "triton"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(layers())
def test_layer_matches_float64_reference(case):
    torch.manual_seed(case["seed"])
    config = moeflux.MoEConfig(hidden_size=case["H"], expert_size=case["D"], num_experts=case["E"], top_k=case["k"],
                               num_shared_experts=case["S"], normalize_topk=case["normalize"])  # fmt: skip
    weights = moeflux.MoEWeights.random(config, dtype=case["dtype"])
    x = torch.randn(case["T"], 2 * case["H"]).to(case["dtype"])
    x = x[:, ::2] if case["strided"] else x[:, : case["H"]].contiguous()

    out, aux = moeflux.moe(x, weights, case["k"], normalize_topk=case["normalize"], backend=case["backend"])

    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.isnan(out).any()
    assert aux.expert_ids.shape == (case["T"], case["k"])
    assert ((aux.expert_ids >= 0) & (aux.expert_ids < case["E"])).all()
    assert int(aux.tokens_per_expert.sum()) == case["T"] * case["k"]
    if case["T"] == 0:
        return
    probs64 = softmax64(x.double() @ weights.router.double().T)
    chosen = probs64.gather(1, aux.expert_ids)
    if case["normalize"]:
        chosen = chosen / chosen.sum(1, keepdim=True)
    expected = moe64(x, weights.router, weights.gate_up, weights.down, aux.expert_ids, chosen, case["S"])
    if expected.norm() > 0:
        assert rel_l2(out, expected) < TOLERANCE[case["dtype"]]
