"""The calls behind the ``ep-*`` cases of ``tests/test_errors.py`` (``moeflux.distributed``).

They run in one process with no process group: where a call needs this rank's place in a
group, :func:`in_group` makes ``torch.distributed`` report one (every check involved runs
before any communication). Shapes as in ``tests/test_errors.py``: H = 16, D = 8, E = 4 routed
experts, k = 2, S = 1 shared slice, T = 3 tokens.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import torch

import moeflux
from moeflux.distributed import (
    ExchangePlan,
    ExpertParallelMoE,
    ExpertPartition,
    ExpertShard,
    all_to_all_start,
    combine,
    dispatch,
    expert_parallel_moe,
    plan_exchange,
)

H, D, E, K, S, T = 16, 8, 4, 2, 1, 3
CONFIG = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=K, num_shared_experts=S)


def in_group(rank: int, world_size: int):
    """``torch.distributed`` as seen by ``rank`` of an initialised group of ``world_size``."""
    return mock.patch.multiple(
        "torch.distributed",
        is_available=lambda: True,
        is_initialized=lambda: True,
        get_rank=lambda group=None: rank,
        get_world_size=lambda group=None: world_size,
    )


def weights(**overrides) -> moeflux.MoEWeights:
    packed = moeflux.MoEWeights.random(CONFIG, generator=torch.Generator().manual_seed(0))
    return dataclasses.replace(packed, **overrides)


def shard(rank: int = 0, world_size: int = 2, **overrides) -> ExpertShard:
    part = ExpertShard.from_weights(weights(), ExpertPartition(E, world_size), rank)
    return dataclasses.replace(part, **overrides)


def tokens(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*(shape or (T, H)), dtype=dtype).to(device)


def plan() -> ExchangePlan:
    """A hand-made plan of rank 0 of 2: T = 3 tokens, k = 2, 4 pairs kept here, 2 sent away,
    R = 4 rows received."""
    return ExchangePlan(
        num_tokens=T, top_k=K, send_order=torch.arange(T * K), pair_to_send=torch.arange(T * K),
        send_splits=[4, 2], recv_splits=[4, 0], recv_expert_ids=torch.tensor([0, 0, 1, 1]),
        recv_tokens_per_expert=torch.tensor([2, 2]), group=None,
    )  # fmt: skip


# moeflux.distributed.ExpertPartition, ExpertShard


def partition_not_positive():
    return ExpertPartition(num_experts=0, world_size=2)


def partition_too_few_experts():
    return ExpertPartition(num_experts=3, world_size=4)


def partition_rank():
    return ExpertPartition(E, 2).experts_of(2)


def shard_partition_experts():
    return ExpertShard.from_weights(weights(), ExpertPartition(6, 2), 0)


def shard_not_this_rank():
    return shard(rank=0).check(ExpertPartition(E, 2), 1)


def shard_shape():
    return shard(shared_down=torch.randn(S, D, H + 1)).check(ExpertPartition(E, 2), 0)


def shard_dtype_device():
    return shard(router=weights().router.double()).check(ExpertPartition(E, 2), 0)


# exchange


def no_process_group():
    return plan_exchange(torch.zeros(T, K, dtype=torch.int64), ExpertPartition(E, 2))


def plan_world_size():
    with in_group(0, 4):
        return plan_exchange(torch.zeros(T, K, dtype=torch.int64), ExpertPartition(E, 2))


def dispatch_shapes():
    return dispatch(tokens(), torch.rand(T, K + 1), plan())


def combine_shape():
    return combine(tokens(5, H), plan())


def wait_twice():
    class Done:
        def wait(self):
            pass

    with mock.patch("torch.distributed.all_to_all_single", lambda *args, **kwargs: Done()):
        pending = all_to_all_start(tokens(), [T, 0], [T, 0])
        pending.wait()
        pending.wait()


# expert_parallel_moe (input checks, before any communication)


def layer_x_not_tensor():
    return expert_parallel_moe([[0.0] * H], shard(), K)


def layer_x_rank():
    return expert_parallel_moe(tokens(H), shard(), K)


def layer_x_hidden_size():
    return expert_parallel_moe(tokens(T, H - 1), shard(), K)


def layer_x_dtype_unsupported():
    return expert_parallel_moe(torch.ones(T, H, dtype=torch.int64), shard(), K)


def layer_x_dtype_mismatch():
    return expert_parallel_moe(tokens(dtype=torch.float16), shard(), K)


def layer_x_device_mismatch():
    return expert_parallel_moe(tokens(device="meta"), shard(), K)


def layer_top_k():
    return expert_parallel_moe(tokens(), shard(), E + 1)


# ExpertParallelMoE


def module_weights_mismatch():
    other = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E + 2, top_k=K, num_shared_experts=S)
    with in_group(0, 2):
        return ExpertParallelMoE(CONFIG, weights=moeflux.MoEWeights.random(other))


def module_expert_bias_off():
    with in_group(0, 2):
        return ExpertParallelMoE(CONFIG, weights=weights(expert_bias=torch.zeros(E)))
