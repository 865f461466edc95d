"""ExpertPartition and ExpertShard: who owns which experts, and the views one rank holds."""

from __future__ import annotations

import pytest
import torch

import moeflux
from moeflux.distributed import ExpertPartition, ExpertShard


@pytest.mark.parametrize(
    "num_experts, world_size, sizes",
    [
        (8, 2, (4, 4)),  # even
        (7, 2, (4, 3)),  # uneven: the first rank takes the extra expert
        (10, 4, (3, 3, 2, 2)),  # E % W = 2 extra experts on the first two ranks
        (4, 4, (1, 1, 1, 1)),  # E = W: one expert a rank
        (5, 1, (5,)),  # one rank owns everything
        (129, 8, (17,) + (16,) * 7),  # a prime-ish E over 8 GPUs
    ],
)
def test_partition_blocks(num_experts: int, world_size: int, sizes: tuple[int, ...]) -> None:
    partition = ExpertPartition(num_experts, world_size)
    assert partition.sizes == sizes
    assert partition.offsets[0] == 0 and partition.offsets[-1] == num_experts
    owned = [e for rank in range(world_size) for e in partition.experts_of(rank)]
    assert owned == list(range(num_experts))  # every expert once, in rank order
    assert all(len(partition.experts_of(rank)) == size for rank, size in enumerate(sizes))


@pytest.mark.parametrize("shared", [0, 2])
def test_shard_views_and_local_weights(shared: int) -> None:
    config = moeflux.MoEConfig(hidden_size=16, expert_size=8, num_experts=7, top_k=2, num_shared_experts=shared)
    weights = moeflux.MoEWeights.random(config, generator=torch.Generator().manual_seed(0))
    partition = ExpertPartition(7, 2)
    shard = ExpertShard.from_weights(weights, partition, 1)  # experts 4, 5, 6
    shard.check(partition, 1)
    assert shard.first_expert == 4 and shard.num_local_experts == 3 and shard.num_shared_experts == shared
    assert torch.equal(shard.gate_up, weights.gate_up[4:7]) and torch.equal(shard.down, weights.down[4:7])
    assert shard.gate_up.data_ptr() == weights.gate_up[4].data_ptr()  # a view, no copy
    assert torch.equal(shard.shared_gate_up, weights.gate_up[7:]) and shard.router is weights.router

    routed = shard.routed_weights()
    assert routed.num_experts == 3 and routed.num_shared_experts == 0 and routed.gate_up is shard.gate_up
    assert torch.equal(routed.router, weights.router[4:7])
    assert shard.routed_weights() is routed  # cached: the Triton kernels' tables are built once
    shared_weights = shard.shared_weights()
    if shared == 0:
        assert shared_weights is None
    else:
        assert shared_weights.num_experts == shared and shared_weights.num_shared_experts == 0
        assert shared_weights.gate_up is shard.shared_gate_up and shard.shared_weights() is shared_weights
    shard.gate_up = shard.gate_up.clone()  # new tensors: new local weights
    assert shard.routed_weights() is not routed
