"""Expert parallelism on 2 and 4 Gloo processes against the single-process layer.

Each test spawns its ranks once (a few seconds) and runs a list of cases in them; a failing
case names itself, its rank and the tensor that differs. Shapes: H = 16, D = 8.
"""

from __future__ import annotations

import pytest
import torch

import moeflux
from tests.distributed import _workers
from tests.distributed._spawn import run_ranks
from tests.distributed._workers import Case

DEEPSEEK = moeflux.RouterConfig(
    scoring="sigmoid", expert_bias=True, num_groups=2, topk_groups=1, normalize_topk=True, scaling_factor=2.5
)

# Tokens per rank: uneven loads everywhere, a rank with no tokens in some cases.
PARITY_CASES = [
    # E divisible by W; k = 2; one shared slice; a rank without tokens (rank 1)
    Case("even-split", num_experts=8, top_k=2, shared=1, tokens=(6, 0, 9, 4)),
    # E = 7: 4 + 3 experts over 2 ranks, 2 + 2 + 2 + 1 over 4; two shared slices; k = 3
    Case("uneven-split", num_experts=7, top_k=3, shared=2, tokens=(5, 8, 1, 3)),
    # no token chooses the last rank's experts: it receives no rows (and has no shared expert)
    Case("rank-receives-nothing", num_experts=8, top_k=2, shared=0, tokens=(7, 5, 6, 3), steer="starve-last-rank"),
    # every token's first choice is expert 0: rank 0 gets most rows; [B, S, H] input
    Case("hot-expert-3d", num_experts=8, top_k=2, shared=1, tokens=(6, 4, 8, 2), steer="hot-expert", batch=2),
    # k = E (every token visits every rank)
    Case("top-k-equals-experts", num_experts=4, top_k=4, shared=1, tokens=(3, 2, 5, 1)),
    # the router passed through: sigmoid scores, correction bias, groups, renormalised, scaled
    Case("deepseek-router", num_experts=8, top_k=2, shared=1, tokens=(9, 3, 4, 6), router=DEEPSEEK),
    # capacity: each rank's own tokens set the capacity (the reference runs per rank too)
    Case(
        "capacity", num_experts=4, top_k=2, shared=0, tokens=(12, 6, 9, 3),
        router=moeflux.RouterConfig(capacity_factor=0.75), overlap=False,
    ),
]


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_matches_single_process(world_size: int) -> None:
    """The all-to-all alone (rows and gradients land where the splits say), then every parity
    case: output, aux and every gradient; on 2 ranks also ``overlap`` on vs off (bitwise) and
    the module (replicated parameters broadcast, slices of given weights)."""
    run_ranks(_workers.check_all, world_size, PARITY_CASES, world_size == 2)


def test_triton_kernels_match_single_process() -> None:
    """The Triton path (interpreted on the CPU), float32, as the GPU runs it."""
    cases = [
        Case("triton", num_experts=4, top_k=2, shared=1, tokens=(5, 3), dtype=torch.float32, backend="triton"),
        Case(
            "triton-receives-nothing", num_experts=4, top_k=1, shared=0, tokens=(4, 0), dtype=torch.float32,
            backend="triton", steer="starve-last-rank",
        ),
    ]
    run_ranks(_workers.check_parity, 2, cases)
