"""The token exchange of expert parallelism: counts, dispatch and combine over all-to-alls.

A rank's ``T`` tokens chose ``k`` experts each: ``P = T k`` *(token, slot) pairs*, flat index
``p = t k + j``. Sorted by expert id (stable), the pairs are also sorted by the rank that
owns the expert, so row ``i`` of the send buffer is pair ``send_order[i]`` and rank ``r``'s rows
are one contiguous block::

    plan_exchange   tokens_per_expert [E] --all-to-all--> recv counts [W, E_r]    (one host sync)
    dispatch        x[token(send_order)] [P, H], weights [P] --all-to-all--> [R, H], [R]
    (experts)       y = w * SwiGLU_e(x) on the R received rows              (the rank's own GEMMs)
    combine         y [R, H] --all-to-all back--> [P, H] --unsort--> sum of each token's k rows

Every exchange is :func:`all_to_all`, differentiable: its backward is the reverse exchange
(the split sizes swapped). The routing weight travels with its row (4 bytes beside the ``H``
activations) and is applied at the expert, in the down GEMM's epilogue, so the rows that come
back are already weighted and the combine is a plain sum; the gradient of a weight comes back
through the reverse of the weights' exchange.

Split sizes are host integers, so :func:`plan_exchange` copies the counts to the host once per
layer call (a device sync; ``all_to_all_single`` needs them to size its buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from moeflux.distributed.partition import ExpertPartition


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group`` (the default group when ``None``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert parallelism needs torch.distributed initialised (torch.distributed.init_process_group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


# --------------------------------------------------------------------------------------
# the all-to-all, differentiable, optionally left in flight
# --------------------------------------------------------------------------------------


class _InFlight:
    """One exchange in flight: its work handle, the buffers it must keep alive, and the
    gradient the backward's reverse exchange writes."""

    __slots__ = ("buffers", "grad_input", "work")

    def __init__(self) -> None:
        self.work = None
        self.buffers: tuple = ()
        self.grad_input: torch.Tensor | None = None

    def launch(self, output, input, output_splits, input_splits, group) -> None:
        self.work = dist.all_to_all_single(output, input, output_splits, input_splits, group=group, async_op=True)
        self.buffers = (output, input)

    def wait(self) -> None:
        self.work.wait()
        self.work, self.buffers = None, ()


def _exchange_buffer(input: torch.Tensor, rows: int) -> torch.Tensor:
    return input.new_empty((rows, *input.shape[1:]))


class _StartAllToAll(torch.autograd.Function):
    """Forward: launch the exchange, return its (not yet written) output. Backward: wait for
    the reverse exchange that :class:`_WaitAllToAll`'s backward launched."""

    @staticmethod
    def forward(ctx, input, output_splits, input_splits, group, flight):
        input = input.contiguous()
        output = _exchange_buffer(input, sum(output_splits))
        flight.launch(output, input, output_splits, input_splits, group)
        ctx.flight = flight
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, _unused):
        flight = ctx.flight
        flight.wait()
        grad_input, flight.grad_input = flight.grad_input, None
        return grad_input, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange. Backward: launch the reverse exchange of the gradient
    (received rows go back to their senders), waited for by :class:`_StartAllToAll`'s backward;
    what runs between the two in the backward overlaps it, as in the forward."""

    @staticmethod
    def forward(ctx, output, output_splits, input_splits, group, flight):
        flight.wait()
        ctx.splits, ctx.group, ctx.flight = (output_splits, input_splits), group, flight
        return output.view_as(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        output_splits, input_splits = ctx.splits
        grad_output = grad_output.contiguous()
        grad_input = _exchange_buffer(grad_output, sum(input_splits))
        ctx.flight.launch(grad_input, grad_output, input_splits, output_splits, ctx.group)
        ctx.flight.grad_input = grad_input
        return grad_output, None, None, None, None


class PendingAllToAll:
    """An all-to-all in flight (:func:`all_to_all_start`); :meth:`wait` returns its output."""

    def __init__(self, output: torch.Tensor, output_splits, input_splits, group, flight: _InFlight) -> None:
        self._args = (output, output_splits, input_splits, group, flight)

    def wait(self) -> torch.Tensor:
        if self._args is None:
            raise RuntimeError("this all-to-all was already waited for")
        args, self._args = self._args, None
        return _WaitAllToAll.apply(*args)


def all_to_all_start(
    input: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> PendingAllToAll:
    """Launch :func:`all_to_all` without waiting: work queued before :meth:`PendingAllToAll.wait`
    overlaps the exchange (on NCCL, which runs it on its own stream), and likewise in the
    backward, where the reverse exchange is launched first and waited for last."""
    flight = _InFlight()
    output = _StartAllToAll.apply(input, list(output_splits), list(input_splits), group, flight)
    return PendingAllToAll(output, list(output_splits), list(input_splits), group, flight)


def all_to_all(
    input: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``torch.distributed.all_to_all_single`` along dim 0, differentiable.

    This rank sends rows ``sum(input_splits[:r]) ..`` (``input_splits[r]`` of them) to rank
    ``r`` and receives ``output_splits[r]`` rows from rank ``r``, placed in rank order. The
    backward sends the output's gradient back the same way with the splits swapped.
    Works on every backend that has ``all_to_all_single`` (NCCL; Gloo on the CPU).

    Args:
        input: ``[sum(input_splits), ...]``.
        output_splits, input_splits: ``[W]`` host ints; rank ``r``'s ``output_splits[s]`` must
            equal rank ``s``'s ``input_splits[r]``.
        group: the process group (default: the world).

    Returns:
        ``[sum(output_splits), ...]`` in ``input``'s dtype.
    """
    return all_to_all_start(input, output_splits, input_splits, group).wait()


# --------------------------------------------------------------------------------------
# the exchange plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExchangePlan:
    """Where this rank's pairs go and what it receives, for one layer call.

    Attributes:
        num_tokens: ``T``, this rank's tokens.
        top_k: ``k``, routed pairs per token.
        send_order: ``[P]`` int64, send row ``i`` holds pair ``send_order[i]`` (token
            ``send_order[i] // k``); the pairs sorted by global expert id, stable, so rank
            ``r``'s rows form block ``r`` and stay in pair order within an expert.
        pair_to_send: ``[P]`` int64, the inverse: ``pair_to_send[send_order] = arange(P)``.
        send_splits: ``[W]`` host ints, pairs sent to each rank; sums to ``P``.
        recv_splits: ``[W]`` host ints, rows received from each rank; sums to ``R``.
        recv_expert_ids: ``[R]`` int64, the local expert (``0 .. E_r - 1``) of each received
            row: rows from rank 0 first, each rank's sorted by expert.
        recv_tokens_per_expert: ``[E_r]`` int64, received rows per local expert (all ranks).
        group: the process group of the exchange.
    """

    num_tokens: int
    top_k: int
    send_order: torch.Tensor
    pair_to_send: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_expert_ids: torch.Tensor
    recv_tokens_per_expert: torch.Tensor
    group: dist.ProcessGroup | None

    @property
    def num_received(self) -> int:
        """``R``, the rows this rank's experts process."""
        return sum(self.recv_splits)


def plan_exchange(
    expert_ids: torch.Tensor,
    partition: ExpertPartition,
    *,
    tokens_per_expert: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> ExchangePlan:
    """Sort this rank's pairs by expert, exchange the per-expert counts, and size every buffer.

    Collective: every rank of ``group`` calls it in the same order. One all-to-all of ``E``
    int64 counts, then one device-to-host copy of ``E + W E_r`` ints (the layer's one host sync).

    Args:
        expert_ids: ``[T, k]`` global routed expert ids in ``[0, E)`` (the router's).
        partition: the experts' owners; ``partition.world_size`` must be the group's size.
        tokens_per_expert: ``[E]`` pairs per expert when already known (the router's);
            counted from ``expert_ids`` otherwise.
        group: the process group (default: the world).
    """
    rank, world_size = group_rank_and_size(group)
    if partition.world_size != world_size:
        raise ValueError(f"the partition is over {partition.world_size} ranks but the group has {world_size}")
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    send_order = torch.argsort(flat_ids, stable=True)
    pair_to_send = torch.empty_like(send_order)
    pair_to_send[send_order] = torch.arange(send_order.numel(), device=send_order.device)
    if tokens_per_expert is None:
        tokens_per_expert = torch.bincount(flat_ids, minlength=partition.num_experts)
    counts = tokens_per_expert.to(torch.int64).contiguous()

    local = len(partition.experts_of(rank))
    recv_counts = counts.new_empty(world_size * local)  # [W, E_r]: rows from rank s for local expert e
    dist.all_to_all_single(recv_counts, counts, [local] * world_size, list(partition.sizes), group=group)
    host = torch.cat([counts, recv_counts]).tolist()  # the one host sync
    sent, received = host[: partition.num_experts], host[partition.num_experts :]
    offsets = partition.offsets
    send_splits = [sum(sent[offsets[r] : offsets[r + 1]]) for r in range(world_size)]
    recv_splits = [sum(received[s * local : (s + 1) * local]) for s in range(world_size)]
    local_ids = torch.arange(local, device=counts.device).repeat(world_size)
    recv_expert_ids = torch.repeat_interleave(local_ids, recv_counts, output_size=sum(recv_splits))
    return ExchangePlan(
        num_tokens=num_tokens,
        top_k=top_k,
        send_order=send_order,
        pair_to_send=pair_to_send,
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_expert_ids=recv_expert_ids,
        recv_tokens_per_expert=recv_counts.view(world_size, local).sum(dim=0),
        group=group,
    )


# --------------------------------------------------------------------------------------
# dispatch and combine
# --------------------------------------------------------------------------------------


class _GatherPairs(torch.autograd.Function):
    """``rows[i] = x[send_order[i] // k]``; the backward sums each token's ``k`` row gradients
    in slot order in float32 (deterministic, no atomics), as the single-GPU path does."""

    @staticmethod
    def forward(ctx, x, send_order, top_k):
        ctx.save_for_backward(send_order)
        ctx.top_k = top_k
        return x.index_select(0, send_order // top_k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        (send_order,) = ctx.saved_tensors
        num_pairs, hidden = grad_rows.shape
        grad_pairs = torch.empty_like(grad_rows).index_copy_(0, send_order, grad_rows)
        accumulate = torch.promote_types(grad_rows.dtype, torch.float32)
        grad_x = grad_pairs.view(num_pairs // ctx.top_k, ctx.top_k, hidden).sum(dim=1, dtype=accumulate)
        return grad_x.to(grad_rows.dtype), None, None


class PendingDispatch:
    """A dispatch in flight (:func:`dispatch_start`); :meth:`wait` returns
    ``(recv_x [R, H], recv_weights [R])``."""

    def __init__(self, rows: PendingAllToAll, weights: PendingAllToAll) -> None:
        self._rows, self._weights = rows, weights

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows.wait(), self._weights.wait()


def dispatch_start(x: torch.Tensor, expert_weights: torch.Tensor, plan: ExchangePlan) -> PendingDispatch:
    """Launch :func:`dispatch`; work queued before ``wait()`` overlaps the exchange."""
    if x.dim() != 2 or x.shape[0] != plan.num_tokens or expert_weights.shape != (plan.num_tokens, plan.top_k):
        raise ValueError(
            f"expected x [T={plan.num_tokens}, H] and expert_weights [T, k={plan.top_k}], got "
            f"{list(x.shape)} and {list(expert_weights.shape)}"
        )
    rows = _GatherPairs.apply(x, plan.send_order, plan.top_k)  # [P, H] send order
    weight_dtype = torch.promote_types(expert_weights.dtype, torch.float32)
    weights = expert_weights.reshape(-1).to(weight_dtype).index_select(0, plan.send_order)  # [P]
    return PendingDispatch(
        all_to_all_start(rows, plan.recv_splits, plan.send_splits, plan.group),
        all_to_all_start(weights, plan.recv_splits, plan.send_splits, plan.group),
    )


def dispatch(x: torch.Tensor, expert_weights: torch.Tensor, plan: ExchangePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Send every pair's token row and routing weight to the rank owning its expert.

    Collective. Differentiable in ``x`` and ``expert_weights``.

    Args:
        x: ``[T, H]`` this rank's tokens.
        expert_weights: ``[T, k]`` their routing weights (sent as float32, float64 stays float64).
        plan: from :func:`plan_exchange` on the same routing.

    Returns:
        ``(recv_x [R, H], recv_weights [R] float32 or float64)``; row ``i`` is for local expert
        ``plan.recv_expert_ids[i]``.
    """
    return dispatch_start(x, expert_weights, plan).wait()


def combine(
    expert_out: torch.Tensor, plan: ExchangePlan, shared_out: torch.Tensor | None = None
) -> torch.Tensor:
    """Send the experts' (weighted) rows back and sum each token's ``k`` rows.

    Collective. Differentiable in ``expert_out`` and ``shared_out``.

    Args:
        expert_out: ``[R, H]`` the local experts' output for the received rows, already
            multiplied by their routing weights, in the order :func:`dispatch` returned them.
        plan: the plan of that dispatch.
        shared_out: ``[T, H]``, added to every token (the shared expert's output), or ``None``.

    Returns:
        ``[T, H]`` in ``expert_out``'s dtype: ``out[t] = sum_j rows[t k + j] (+ shared_out[t])``,
        summed in slot order in float32 (float64 for float64) and rounded once.
    """
    if expert_out.dim() != 2 or expert_out.shape[0] != plan.num_received:
        raise ValueError(f"expected expert_out [R={plan.num_received}, H], got {list(expert_out.shape)}")
    hidden = expert_out.shape[1]
    returned = all_to_all(expert_out, plan.send_splits, plan.recv_splits, plan.group)  # [P, H] send order
    pair_rows = returned.index_select(0, plan.pair_to_send).view(plan.num_tokens, plan.top_k, hidden)
    accumulate = torch.promote_types(expert_out.dtype, torch.float32)
    out = pair_rows.sum(dim=1, dtype=accumulate)
    if shared_out is not None:
        out = out + shared_out.to(accumulate)
    return out.to(expert_out.dtype)
