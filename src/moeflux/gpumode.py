"""The GPU MODE ``amd-mixture-of-experts`` competition's contract, on moeflux.

* :func:`generate_input` draws the competition's inputs: the same tensors, in the same
  order, with the same scaling, from a ``torch.Generator`` seeded on the target device.
* :func:`ref_kernel` computes what the competition's reference computes, with the same
  algorithm (argsort by expert, per-expert SwiGLU, ``scatter_reduce`` sum) in the input dtype.
* :func:`custom_kernel` runs moeflux's own layer and returns the ``[bs, seq, H]`` output the
  competition's harness compares with ``ref_kernel`` (``allclose``, rtol = atol = 1e-2). On
  the Triton backend it reads the per-expert weights in place (no packing copy).

``data`` is the tuple ``(input [bs, seq, H], weights: dict[str, Tensor], config: dict)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from moeflux.backends import resolve_backend
from moeflux.config import MoEConfig
from moeflux.layer import MoEAux, moe
from moeflux.ops.routing import Routing, route
from moeflux.weights import MoEWeights

SeedData = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]


def generate_input(
    dhidden: int,
    dexpert: int,
    nroutedexperts: int,
    nsharedexperts: int,
    nexpertspertoken: int,
    bs: int,
    seqlen: int,
    seed: int,
    device: torch.device | str = "cuda",
) -> SeedData:
    """The competition's inputs: fp16 Gaussians drawn in this order, each scaled by
    ``1/sqrt(fan)``: input ``[bs, seq, H]`` (unscaled), ``router.weight [E, H]`` (``/sqrt(H)``),
    then per expert gate ``[H, D]`` and up ``[H, D]`` (``/sqrt(D)``) and down ``[D, H]``
    (``/sqrt(H)``), then the shared gate, up (``/sqrt(D*S)``) and down (``/sqrt(H)``)."""
    config = {
        "d_hidden": dhidden,
        "d_expert": dexpert,
        "n_routed_experts": nroutedexperts,
        "n_shared_experts": nsharedexperts,
        "n_experts_per_token": nexpertspertoken,
        "batch_size": bs,
        "seq_len": seqlen,
    }
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def draw(*shape: int, fan: int) -> torch.Tensor:
        sample = torch.randn(shape, device=device, dtype=torch.float16, generator=generator)
        return sample / math.sqrt(fan) if fan else sample

    x = draw(bs, seqlen, dhidden, fan=0).contiguous()
    weights = {"router.weight": draw(nroutedexperts, dhidden, fan=dhidden)}
    for i in range(nroutedexperts):
        weights[f"experts.{i}.0.weight"] = draw(dhidden, dexpert, fan=dexpert)
        weights[f"experts.{i}.1.weight"] = draw(dhidden, dexpert, fan=dexpert)
        weights[f"experts.{i}.2.weight"] = draw(dexpert, dhidden, fan=dhidden)
    shared_width = dexpert * nsharedexperts
    weights["shared_experts.0.weight"] = draw(dhidden, shared_width, fan=shared_width)
    weights["shared_experts.1.weight"] = draw(dhidden, shared_width, fan=shared_width)
    weights["shared_experts.2.weight"] = draw(shared_width, dhidden, fan=dhidden)
    return x, weights, config


def ref_kernel(data: SeedData) -> torch.Tensor:
    """The competition's reference algorithm, in the input dtype; returns ``[bs, seq, H]``."""
    x, weights, config = data
    num_experts, top_k = config["n_routed_experts"], config["n_experts_per_token"]
    hidden = x.shape[-1]
    tokens = x.reshape(-1, hidden)

    def swiglu(rows: torch.Tensor, prefix: str) -> torch.Tensor:
        gate = F.silu(rows @ weights[f"{prefix}.0.weight"])
        return (gate * (rows @ weights[f"{prefix}.1.weight"])) @ weights[f"{prefix}.2.weight"]

    scores = F.linear(tokens, weights["router.weight"]).softmax(dim=-1)
    top_scores, top_ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    flat_ids = top_ids.reshape(-1)
    order = flat_ids.argsort()
    ends = flat_ids.bincount(minlength=num_experts).cumsum(0).tolist()
    routed = torch.zeros_like(tokens)
    start = 0
    for expert, end in enumerate(ends):
        if end > start:
            pairs = order[start:end]
            token_ids = pairs // top_k
            rows = swiglu(tokens[token_ids], f"experts.{expert}") * top_scores.reshape(-1, 1)[pairs]
            routed.scatter_reduce_(0, token_ids[:, None].expand(-1, hidden), rows, reduce="sum")
        start = end
    shared = swiglu(tokens, "shared_experts") if config["n_shared_experts"] > 0 else 0
    return (routed + shared).view(x.shape)


def custom_kernel(data: SeedData, *, return_aux: bool = False, backend: str = "auto", cuda_graph: bool = True):
    """moeflux's layer on the competition's inputs.

    Returns the output ``[bs, seq, H]``, or ``(output, aux)`` with ``aux`` the dict of
    :class:`moeflux.MoEAux` fields when ``return_aux`` is set.

    ``backend`` is resolved as everywhere in moeflux (:mod:`moeflux.backends`; ``"auto"`` is
    Triton on CUDA), and picks one of two paths:

    * ``"triton"`` (CUDA; the CPU under ``TRITON_INTERPRET=1``): the weights are used in place.
      The harness passes new weight tensors on every call, and packing them into moeflux's
      layout would copy all of them on every call (2.8 GB at the competition's shapes: 2-3.5 ms
      of a 6-10 ms call on an H100). Instead the grouped GEMMs read each expert's matrices
      through address tables (:meth:`moeflux.expert_tables.ExpertTables.from_seed_weights`),
      which cost one small host-to-device copy. Same kernels, same order as :func:`moeflux.moe`
      on the packed weights, so the same output bit for bit.
    * ``"torch"`` (the CPU otherwise): :func:`moeflux.moe` on the weights packed once per call
      (:meth:`moeflux.MoEWeights.from_seed_weights`), since the torch path's batched GEMMs read
      one stacked tensor per projection.

    ``cuda_graph`` (Triton on CUDA): replay the forward's kernels from a CUDA graph captured on
    the first call of each input shape, rather than launching them one by one. The harness
    synchronises around every call, so the host time of ~25 launches before the first GEMM
    (about 1 ms on the H100 machine, ``benchmarks/harness_probe_gpu.py``) counts in full; a
    replay is one launch. Inputs are copied into the graph's buffers (the weights' addresses
    only: the kernels read the weights where they are) and outputs copied out of them, so results
    are never overwritten by a later call. Each captured shape keeps its workspace (about
    ``T * (k + S) * (D + H) * 2`` bytes plus the input) until :func:`release_graphs`; at most
    four shapes are kept.
    """
    x, weights, config = data
    moe_config = MoEConfig.from_seed_config(config)
    with torch.no_grad():
        if resolve_backend(backend, x.device) == "triton":
            out, aux = _moe_in_place(x, weights, moe_config, with_aux=return_aux, cuda_graph=cuda_graph)
        else:
            packed = MoEWeights.from_seed_weights(weights, moe_config)
            out, aux = moe(x, packed, moe_config.top_k, backend="torch")
    return (out, aux.as_dict()) if return_aux else out


def _moe_in_place(
    x: torch.Tensor, weights: dict[str, torch.Tensor], config: MoEConfig, *, with_aux: bool, cuda_graph: bool
) -> tuple[torch.Tensor, MoEAux | None]:
    """What :func:`moeflux.moe` computes on the Triton backend, with the experts' weights read
    where the dict holds them."""
    from moeflux.expert_tables import ExpertTables, seed_weight

    if x.dim() not in (2, 3) or x.shape[-1] != config.hidden_size:
        raise ValueError(f"x must be [T, {config.hidden_size}] or [B, S, {config.hidden_size}], got {list(x.shape)}")
    tokens = x.reshape(-1, x.shape[-1])
    router = seed_weight(
        weights, "router.weight", (config.num_experts, config.hidden_size), dtype=x.dtype, device=x.device
    )
    if cuda_graph and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        experts = ExpertTables.from_seed_weights(weights, config, dtype=x.dtype, device=x.device)
        out, routing = _graph_for(tokens, router, experts, config)(tokens, router, experts, with_routing=with_aux)
    else:
        routing = route(F.linear(tokens, router), config.top_k, backend="triton")
        # Checking the experts' weights and gathering their addresses is host work: done here,
        # it overlaps the router's kernels instead of delaying them.
        experts = ExpertTables.from_seed_weights(weights, config, dtype=x.dtype, device=x.device)
        out = _experts(tokens, routing, experts)
    if not with_aux:
        return out.view(x.shape), None
    sequence_length = x.shape[1] if x.dim() == 3 else None
    return out.view(x.shape), MoEAux.from_routing(routing, config.top_k, sequence_length=sequence_length)


def _experts(tokens: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
    from moeflux.ops.experts.triton import experts_triton_tables

    return experts_triton_tables(tokens, routing.expert_ids, routing.expert_weights, experts, check_ids=False)


class _GraphedForward:
    """Routing and experts of :func:`_moe_in_place` for one input signature, captured in a
    CUDA graph: ``__call__`` copies the tokens, the router weight and the experts' address
    tables into the graph's own buffers, replays it and returns copies of its outputs (of the
    routing only when the caller builds an aux from it)."""

    def __init__(self, tokens: torch.Tensor, router: torch.Tensor, experts, config: MoEConfig) -> None:
        self.config = config
        self.tokens, self.router = tokens.clone(), router.clone()
        # The graph's tables: their own address buffers, holding no weights alive.
        self.experts = dataclasses.replace(
            experts,
            gate_up=dataclasses.replace(experts.gate_up, addresses=experts.gate_up.addresses.clone(),
                                        leading_strides=experts.gate_up.leading_strides.clone(), tensors=()),
            down=dataclasses.replace(experts.down, addresses=experts.down.addresses.clone(),
                                     leading_strides=experts.down.leading_strides.clone(), tensors=()),
        )  # fmt: skip
        # One eager run first, off the capture: Triton compiles and loads its kernels there.
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out, self.routing = self._forward()

    def _forward(self) -> tuple[torch.Tensor, Routing]:
        routing = route(F.linear(self.tokens, self.router), self.config.top_k, backend="triton")
        return _experts(self.tokens, routing, self.experts), routing

    def __call__(
        self, tokens: torch.Tensor, router: torch.Tensor, experts, *, with_routing: bool
    ) -> tuple[torch.Tensor, Routing | None]:
        self.tokens.copy_(tokens)
        self.router.copy_(router)
        for mine, theirs in ((self.experts.gate_up, experts.gate_up), (self.experts.down, experts.down)):
            mine.addresses.copy_(theirs.addresses)
            mine.leading_strides.copy_(theirs.leading_strides)
        self.graph.replay()
        if not with_routing:  # the aux is built from it: copied only when asked for
            return self.out.clone(), None
        fields = {f.name: getattr(self.routing, f.name) for f in dataclasses.fields(self.routing)}
        routing = type(self.routing)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
        return self.out.clone(), routing


_GRAPHS: OrderedDict[tuple, _GraphedForward] = OrderedDict()
_MAX_GRAPHS = 4


def _graph_for(tokens: torch.Tensor, router: torch.Tensor, experts, config: MoEConfig) -> _GraphedForward:
    """The cached graph of this signature (captured now if new; the oldest of more than four
    is released). The kernels are specialised on the tables' layout and alignment, so those
    are part of the signature; the addresses and leading strides are copied in per call."""
    key = (
        tokens.shape, tokens.stride(), tokens.dtype, tokens.device, config,
        experts.gate_up.column_major, experts.gate_up.align, experts.down.column_major, experts.down.align,
    )  # fmt: skip
    graph = _GRAPHS.get(key)
    if graph is None:
        graph = _GRAPHS[key] = _GraphedForward(tokens, router, experts, config)
        while len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return graph


def release_graphs() -> None:
    """Free the CUDA graphs (and their workspaces) that :func:`custom_kernel` captured."""
    _GRAPHS.clear()
