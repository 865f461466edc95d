"""Expert parallelism: the MoE layer with its routed experts spread over the ranks of a process group.

* :class:`ExpertParallelMoE` / :func:`expert_parallel_moe`: the layer and its functional form.
* :class:`ExpertPartition`: which rank owns which experts (contiguous blocks, uneven splits
  allowed); :class:`ExpertShard`: the weights one rank holds.
* The pieces the layer is built from, each a collective: :func:`plan_exchange` (sort the
  pairs by expert, exchange the counts: the one host sync), :func:`dispatch` (send token rows
  and routing weights to the experts' ranks), :func:`combine` (send the weighted rows back,
  sum each token's), over :func:`all_to_all`, a differentiable ``all_to_all_single``
  (:func:`all_to_all_start` leaves it in flight to overlap other work).

Data flow, sizes and scaling: ``docs/expert-parallel.md``.
"""

from moeflux.distributed.exchange import (
    ExchangePlan,
    PendingAllToAll,
    PendingDispatch,
    all_to_all,
    all_to_all_start,
    combine,
    dispatch,
    dispatch_start,
    plan_exchange,
)
from moeflux.distributed.layer import ExpertParallelMoE, expert_parallel_moe
from moeflux.distributed.partition import ExpertPartition, ExpertShard

__all__ = [
    "ExchangePlan",
    "ExpertParallelMoE",
    "ExpertPartition",
    "ExpertShard",
    "PendingAllToAll",
    "PendingDispatch",
    "all_to_all",
    "all_to_all_start",
    "combine",
    "dispatch",
    "dispatch_start",
    "expert_parallel_moe",
    "plan_exchange",
]
