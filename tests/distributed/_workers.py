"""What each rank runs in the expert-parallel tests (spawned by :func:`tests.distributed._spawn.run_ranks`).

Every rank builds the same whole-layer weights and every rank's tokens from one seed, so each
rank can compute the single-process reference itself: :func:`moeflux.moe` on each rank's
tokens with the whole weights, the loss summed over the ranks. The expert-parallel gradients
of the replicated parameters (router, shared expert) are summed over the ranks before the
comparison, as a data-parallel trainer would; the routed experts' gradients are compared
slice by slice; ``dx`` and ``aux`` per rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import moeflux
from moeflux.distributed import (
    ExpertParallelMoE,
    ExpertPartition,
    ExpertShard,
    all_to_all,
    all_to_all_start,
    expert_parallel_moe,
)

H, D = 16, 8
LOSS_COEFFICIENTS = {"load_balancing_loss": 0.1, "router_z_loss": 0.01, "sequence_balance_loss": 0.05}


@dataclass(frozen=True)
class Case:
    """One parity check. ``tokens``: tokens per rank (the last entries are used for fewer ranks
    only when the list is longer than the world). ``steer``: ``"starve-last-rank"`` makes no
    token choose the last rank's experts (it receives nothing); ``"hot-expert"`` sends every
    token's first slot to expert 0 (rank 0 gets far more rows than the others)."""

    name: str
    num_experts: int
    top_k: int
    shared: int
    tokens: tuple[int, ...]
    dtype: torch.dtype = torch.float64
    backend: str = "torch"
    batch: int | None = None  # [B, S, H] input with B = batch (S = tokens / B)
    steer: str | None = None
    router: moeflux.RouterConfig = field(default_factory=moeflux.RouterConfig)
    overlap: bool = True


# Tolerances: float64 through the same ops in another order is exact to ~1e-15; float32 on the
# Triton kernels (interpreted) to ~1e-6 of unit-scale values.
TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 2e-4, "atol": 2e-5}}


def make_problem(case: Case, world_size: int):
    """``(whole weights, [x per rank], [grad_out per rank])`` from one seed, the same on every rank."""
    generator = torch.Generator().manual_seed(1234)
    config = moeflux.MoEConfig(
        hidden_size=H, expert_size=D, num_experts=case.num_experts, top_k=case.top_k,
        num_shared_experts=case.shared, router=case.router,
    )  # fmt: skip
    weights = moeflux.MoEWeights.random(config, dtype=case.dtype, generator=generator)
    if weights.expert_bias is not None:
        weights.expert_bias.copy_(0.3 * torch.randn(case.num_experts, generator=generator))
    tokens = case.tokens[:world_size]
    xs = [torch.randn(T, H, dtype=case.dtype, generator=generator) for T in tokens]
    grads = [torch.randn(T, H, dtype=case.dtype, generator=generator) for T in tokens]
    if case.steer is not None:
        with torch.no_grad():
            for x in xs:
                x[:, 0] = 4.0
            if case.steer == "starve-last-rank":
                starved = ExpertPartition(case.num_experts, world_size).experts_of(world_size - 1)
                weights.router[starved.start : starved.stop, 0] = -8.0
            elif case.steer == "hot-expert":
                weights.router[0, 0] = 8.0
            else:
                raise ValueError(case.steer)
    return config, weights, xs, grads


def shaped(x: torch.Tensor, case: Case) -> torch.Tensor:
    return x.view(case.batch, -1, H) if case.batch else x


def loss_of(out: torch.Tensor, aux: moeflux.MoEAux, grad_out: torch.Tensor) -> torch.Tensor:
    loss = (out.reshape(-1, H) * grad_out).sum()
    for name, coefficient in LOSS_COEFFICIENTS.items():
        loss = loss + coefficient * getattr(aux, name)
    return loss


def leaves(weights: moeflux.MoEWeights) -> moeflux.MoEWeights:
    copy = [t.detach().clone().requires_grad_() for t in (weights.router, weights.gate_up, weights.down)]
    return moeflux.MoEWeights(*copy, expert_bias=weights.expert_bias)


def reference(case: Case, weights, xs, grads):
    """The single-process layer on every rank's tokens: ``(outs, auxes, x grads, whole-weight grads)``."""
    w = leaves(weights)
    xs = [x.clone().requires_grad_() for x in xs]
    results = [moeflux.moe(shaped(x, case), w, case.top_k, router=case.router, backend=case.backend) for x in xs]
    total = sum(loss_of(out, aux, g) for (out, aux), g in zip(results, grads))
    total.backward()
    outs = [out.detach() for out, _ in results]
    auxes = [aux for _, aux in results]
    return outs, auxes, [x.grad for x in xs], (w.router.grad, w.gate_up.grad, w.down.grad)


def assert_close(actual, expected, what: str, case: Case, rank: int) -> None:
    try:
        torch.testing.assert_close(actual, expected, **TOLERANCES[case.dtype])
    except AssertionError as error:
        raise AssertionError(f"[{case.name}, rank {rank}] {what}: {error}") from None


def check_parity(rank: int, world_size: int, cases: list[Case]) -> None:
    """Expert-parallel forward, aux and every gradient against the single-process layer."""
    for case in cases:
        _, weights, xs, grads = make_problem(case, world_size)
        outs, auxes, x_grads, (d_router, d_gate_up, d_down) = reference(case, weights, xs, grads)

        partition = ExpertPartition(case.num_experts, world_size)
        w = leaves(weights)
        shard = ExpertShard.from_weights(w, partition, rank)
        x = xs[rank].clone().requires_grad_()
        out, aux = expert_parallel_moe(
            shaped(x, case), shard, case.top_k, router=case.router, backend=case.backend, overlap=case.overlap
        )
        loss_of(out, aux, grads[rank]).backward()

        assert out.shape == shaped(xs[rank], case).shape and out.dtype == case.dtype
        assert_close(out, outs[rank], "out", case, rank)
        for name, expected in auxes[rank].as_dict().items():
            assert_close(getattr(aux, name).detach(), expected.detach(), f"aux.{name}", case, rank)
        assert_close(x.grad, x_grads[rank], "dx", case, rank)
        # The routed experts: this rank's slice holds every rank's tokens' contribution.
        experts = partition.experts_of(rank)
        E = case.num_experts
        for name, grad, expected in (("gate_up", w.gate_up.grad, d_gate_up), ("down", w.down.grad, d_down)):
            assert grad is not None, f"[{case.name}, rank {rank}] no gradient for {name}"
            assert_close(grad[experts.start : experts.stop], expected[experts.start : experts.stop],
                         f"d{name} (own experts)", case, rank)  # fmt: skip
            others = torch.cat([grad[: experts.start], grad[experts.stop : E]])
            assert not others.any(), f"[{case.name}, rank {rank}] gradient on other ranks' experts"
            # The shared slices and the router are replicated: sum over the ranks.
            shared = grad[E:].clone()
            dist.all_reduce(shared)
            assert_close(shared, expected[E:], f"d{name} (shared, summed over ranks)", case, rank)
        router_grad = w.router.grad.clone()
        dist.all_reduce(router_grad)
        assert_close(router_grad, d_router, "drouter (summed over ranks)", case, rank)
        if case.steer == "starve-last-rank" and rank == world_size - 1:  # the steering worked
            assert all(not aux.tokens_per_expert[experts.start : experts.stop].any() for aux in auxes)


def check_overlap_is_exact(rank: int, world_size: int, case: Case) -> None:
    """``overlap`` only reorders independent work: output and gradients bitwise equal."""
    _, weights, xs, grads = make_problem(case, world_size)
    partition = ExpertPartition(case.num_experts, world_size)
    results = []
    for overlap in (True, False):
        w = leaves(weights)
        x = xs[rank].clone().requires_grad_()
        out, aux = expert_parallel_moe(x, ExpertShard.from_weights(w, partition, rank), case.top_k, overlap=overlap)
        loss_of(out, aux, grads[rank]).backward()
        results.append([out.detach(), x.grad, w.router.grad, w.gate_up.grad, w.down.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b), f"rank {rank}: overlap changed a result"


def check_all_to_all(rank: int, world_size: int) -> None:
    """Rows land where the splits say, in rank order; gradients go back the same way."""
    generator = torch.Generator().manual_seed(7)
    splits = torch.randint(0, 4, (world_size, world_size), generator=generator)  # [source, destination]
    splits[0, world_size - 1] = 0  # some empty blocks
    splits[world_size - 1, :] = 0  # a rank that sends nothing
    send_splits = splits[rank].tolist()
    recv_splits = splits[:, rank].tolist()

    def rows(source: int, destination: int) -> torch.Tensor:
        # Row i of the block source -> destination holds (source, destination, i).
        count = int(splits[source, destination])
        index = torch.arange(count, dtype=torch.float64)
        return torch.stack([torch.full_like(index, source), torch.full_like(index, destination), index], dim=1)

    x = torch.cat([rows(rank, r) for r in range(world_size)]).requires_grad_()
    out = all_to_all(x, recv_splits, send_splits)
    expected = torch.cat([rows(s, rank) for s in range(world_size)])
    assert torch.equal(out, expected), f"rank {rank}: {out.tolist()} != {expected.tolist()}"
    out.backward(2 * out.detach() + 1)
    assert torch.equal(x.grad, 2 * x.detach() + 1), f"rank {rank}: gradient rows went elsewhere"

    # In flight while other work runs; a second wait is refused.
    x = torch.cat([rows(rank, r) for r in range(world_size)]).requires_grad_()
    pending = all_to_all_start(x * 3, recv_splits, send_splits)
    busy = x.sum() * 0  # work queued while the exchange is in flight
    out = pending.wait() + busy
    assert torch.equal(out.detach(), 3 * expected)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    try:
        pending.wait()
    except RuntimeError:
        pass
    else:
        raise AssertionError("a second wait() was accepted")


def check_module(rank: int, world_size: int) -> None:
    """``ExpertParallelMoE``: replicated parameters equal on every rank after random init,
    each rank a slice of given weights, the module's forward that of the functional form."""
    config = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=5, top_k=2, num_shared_experts=1)
    torch.manual_seed(100 + rank)  # different draws per rank: the broadcast must align them
    layer = ExpertParallelMoE(config, dtype=torch.float64)
    for parameter in layer.replicated_parameters():
        gathered = [torch.empty_like(parameter) for _ in range(world_size)]
        dist.all_gather(gathered, parameter.detach())
        assert all(torch.equal(g, gathered[0]) for g in gathered), "replicated parameters differ between ranks"
    experts = ExpertPartition(5, world_size).experts_of(rank)
    assert layer.gate_up.shape == (len(experts), H, 2 * D) and layer.shared_gate_up.shape == (1, H, 2 * D)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"router", "gate_up", "down", "shared_gate_up", "shared_down"}, names
    assert {id(p) for p in layer.replicated_parameters()} | {id(p) for p in layer.expert_parameters()} == {
        id(p) for p in layer.parameters()
    }

    weights = moeflux.MoEWeights.random(config, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = ExpertParallelMoE(config, weights=weights)
    assert torch.equal(layer.gate_up, weights.gate_up[experts.start : experts.stop])
    assert torch.equal(layer.shared_down, weights.down[5:])
    assert layer.gate_up.data_ptr() != weights.gate_up.data_ptr(), "the layer must own a copy"
    x = torch.randn(3 + rank, H, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    out, _ = layer(x)
    expected, _ = moeflux.moe(x, weights, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert layer.shard is layer.shard, "the shard (and its kernel tables) must be cached"
    assert f"rank={rank}" in repr(layer)


def check_all(rank: int, world_size: int, cases: list[Case], module: bool) -> None:
    check_all_to_all(rank, world_size)
    check_parity(rank, world_size, cases)
    if module:
        check_overlap_is_exact(rank, world_size, cases[0])
        check_module(rank, world_size)
