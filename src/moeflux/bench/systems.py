"""The systems ``moeflux bench`` times side by side, each behind one small adapter interface.

An adapter is a class with:

* ``name`` (what ``--systems`` takes), ``workload`` (``"moe"`` or ``"flash-expert"``) and a
  one-line ``description``;
* ``available(device) -> bool``, setting ``self.note`` to the reason when it returns False;
* ``prepare(case)``: the one-time work per shape (build modules, stack or copy weights), untimed;
* ``__call__() -> Tensor``: one forward on ``case``'s inputs as they are at call time, returning
  the output (any shape holding ``T * H`` values); the suite picks no_grad or autograd;
* ``leaves() -> list[Tensor]``: the tensors a training step differentiates (input and weights,
  as this system holds them), for ``--mode train``; ``trains = False`` marks a forward-only system;
* ``release()``: drop what ``prepare`` built.

Register a built-in adapter in ``SYSTEMS``; a user's adapter is named on the command line as
``--systems package.module:ClassName`` and imported from there.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from moeflux.layer import moe


class System:
    """Base adapter: holds the case, runs everywhere, differentiates nothing."""

    name = ""
    workload = "moe"
    description = ""
    trains = True  # whether --mode train can differentiate through it

    def __init__(self) -> None:
        self.case = None
        self.note = ""

    def available(self, device: torch.device) -> bool:
        return True

    def prepare(self, case) -> None:
        self.case = case

    def __call__(self) -> torch.Tensor:
        raise NotImplementedError

    def leaves(self) -> list[torch.Tensor]:
        return []

    def release(self) -> None:
        self.case = None


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate) * (x @ up)) @ down


class MoefluxSystem(System):
    """``moeflux.moe`` on the packed weights with one backend."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"moeflux-{backend}"
        self.description = f"moeflux.moe(..., backend={backend!r})"

    def available(self, device: torch.device) -> bool:
        if self.backend != "triton":
            return True
        from moeflux.backends import triton_available

        if not triton_available():
            self.note = "triton is not installed"
        elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            self.note = "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"
        return not self.note

    def __call__(self) -> torch.Tensor:
        case = self.case
        return moe(case.x, case.weights, case.config.top_k, backend=self.backend)[0]

    def leaves(self) -> list[torch.Tensor]:
        weights = self.case.weights
        return [self.case.x, weights.router, weights.gate_up, weights.down]


class SeedReference(System):
    """The competition's reference (``moeflux.gpumode.ref_kernel``): argsort by expert, a
    SwiGLU per expert, ``scatter_reduce`` sum, on the per-expert weight dict."""

    name = "seed-reference"
    description = "moeflux.gpumode.ref_kernel, the competition's reference algorithm"
    trains = False  # it sums into its output in place (scatter_reduce_), which autograd rejects

    def __call__(self) -> torch.Tensor:
        from moeflux import gpumode

        return gpumode.ref_kernel(self.case.seed_data)

    def leaves(self) -> list[torch.Tensor]:
        return [self.case.x, *self.case.seed_weights.values()]


class TorchGroupedMM(System):
    """A MoE written with ``torch._grouped_mm`` the way a user would: weights stacked once,
    tokens sorted by expert, two grouped GEMMs with SwiGLU between, a weighted sum back
    into token order (``index_add_``), the shared expert as a dense SwiGLU."""

    name = "torch-grouped-mm"
    description = "plain PyTorch: stacked weights, sort, 2x torch._grouped_mm, SwiGLU, weighted sum"

    def available(self, device: torch.device) -> bool:
        if not hasattr(torch, "_grouped_mm"):
            self.note = f"torch {torch.__version__} has no torch._grouped_mm"
        return not self.note

    def prepare(self, case) -> None:
        super().prepare(case)
        weights, E = case.seed_weights, case.config.num_experts
        self.router = weights["router.weight"]
        gate_up = [torch.cat([weights[f"experts.{e}.0.weight"], weights[f"experts.{e}.1.weight"]], dim=1)
                   for e in range(E)]  # fmt: skip
        self.gate_up = torch.stack(gate_up)  # [E, H, 2D]
        self.down = torch.stack([weights[f"experts.{e}.2.weight"] for e in range(E)])  # [E, D, H]
        shared = case.config.num_shared_experts > 0
        self.shared = [weights[f"shared_experts.{i}.weight"] for i in range(3)] if shared else []

    def __call__(self) -> torch.Tensor:
        E, top_k = self.case.config.num_experts, self.case.config.top_k
        x = self.case.x.reshape(-1, self.case.x.shape[-1])
        top_weights, top_ids = F.linear(x, self.router).softmax(dim=-1).topk(top_k, dim=-1)
        flat_ids = top_ids.reshape(-1)
        order = flat_ids.argsort()
        token_of_row = order // top_k
        offsets = torch.bincount(flat_ids, minlength=E).cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x[token_of_row], self.gate_up, offs=offsets).chunk(2, dim=-1)
        rows = torch._grouped_mm(F.silu(gate) * up, self.down, offs=offsets)
        rows = rows * top_weights.reshape(-1, 1)[order]
        out = torch.zeros_like(x).index_add_(0, token_of_row, rows)
        return out + _swiglu(x, *self.shared) if self.shared else out

    def leaves(self) -> list[torch.Tensor]:
        return [self.case.x, self.router, self.gate_up, self.down, *self.shared]

    def release(self) -> None:
        super().release()
        self.router = self.gate_up = self.down = None
        self.shared = []


class EagerLoop(System):
    """The first MoE most people write: for each expert, find its tokens (``torch.where``),
    run its SwiGLU on the per-expert weights, ``index_add_`` the weighted rows."""

    name = "eager-loop"
    description = "plain PyTorch: a Python loop over experts, torch.where + SwiGLU + index_add_"

    def __call__(self) -> torch.Tensor:
        weights, config = self.case.seed_weights, self.case.config
        x = self.case.x.reshape(-1, self.case.x.shape[-1])
        top_weights, top_ids = F.linear(x, weights["router.weight"]).softmax(dim=-1).topk(config.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e in range(config.num_experts):
            token_ids, slots = torch.where(top_ids == e)
            if token_ids.numel() == 0:
                continue
            w = [weights[f"experts.{e}.{i}.weight"] for i in range(3)]
            out.index_add_(0, token_ids, _swiglu(x[token_ids], *w) * top_weights[token_ids, slots, None])
        if config.num_shared_experts:
            out = out + _swiglu(x, *(weights[f"shared_experts.{i}.weight"] for i in range(3)))
        return out

    def leaves(self) -> list[torch.Tensor]:
        return [self.case.x, *self.case.seed_weights.values()]


class FlashExpertSystem(System):
    """``moeflux.ops.flash_expert.flash_expert`` with one backend."""

    workload = "flash-expert"

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"flash-expert-{backend}"
        self.description = f"moeflux.ops.flash_expert.flash_expert(..., backend={backend!r})"

    def available(self, device: torch.device) -> bool:
        try:
            from moeflux.ops.flash_expert import flash_expert  # noqa: F401
        except ImportError as error:
            self.note = f"moeflux.ops.flash_expert does not import here ({error})"
            return False
        if self.backend == "triton":
            probe = MoefluxSystem("triton")
            if not probe.available(device):
                self.note = probe.note
                return False
        return True

    def prepare(self, case) -> None:
        super().prepare(case)
        from moeflux.ops.flash_expert import flash_expert

        self.flash_expert = flash_expert

    def __call__(self) -> torch.Tensor:
        # The index range check copies to the host; a hot loop with known-good ids skips it.
        return self.flash_expert(*self.case.inputs(), backend=self.backend, check_indices=False)

    def leaves(self) -> list[torch.Tensor]:
        case = self.case
        return [case.hidden_states, case.down_weights, case.up_weights, case.routing_weights]


def _transformers_qwen3():
    from moeflux.bench.peers import TransformersQwen3Moe

    return TransformersQwen3Moe()


# name -> factory, in the order the suite runs and prints them.
SYSTEMS = {
    "moeflux-triton": lambda: MoefluxSystem("triton"),
    "moeflux-torch": lambda: MoefluxSystem("torch"),
    "torch-grouped-mm": TorchGroupedMM,
    "eager-loop": EagerLoop,
    "hf-qwen3-moe": _transformers_qwen3,
    "seed-reference": SeedReference,
    "flash-expert-triton": lambda: FlashExpertSystem("triton"),
    "flash-expert-torch": lambda: FlashExpertSystem("torch"),
}

# What each workload measures speed-ups against, first present wins.
BASELINES = {"moe": ["torch-grouped-mm", "seed-reference"], "flash-expert": ["flash-expert-torch"]}


def default_systems(workload: str, device: torch.device) -> list[str]:
    """Every built-in system of ``workload``; Triton ones only on a GPU (the CPU interpreter
    is for tests, far too slow to time)."""
    names = [name for name, make in SYSTEMS.items() if _workload_of(name) == workload]
    if device.type != "cuda":
        names = [name for name in names if not name.endswith("-triton")]
    return names


def _workload_of(name: str) -> str:
    return "flash-expert" if name.startswith("flash-expert-") else "moe"


def make_system(name: str) -> System:
    """The adapter called ``name``: a built-in, or ``package.module:ClassName``."""
    if name in SYSTEMS:
        return SYSTEMS[name]()
    if ":" in name:
        module_name, class_name = name.split(":", 1)
        try:
            adapter = getattr(importlib.import_module(module_name), class_name)()
        except (ImportError, AttributeError) as error:
            raise SystemExit(f"cannot load the adapter {name!r}: {error}") from error
        if not getattr(adapter, "name", ""):
            adapter.name = name
        return adapter
    raise SystemExit(
        f"unknown system {name!r}; built-in systems: {', '.join(SYSTEMS)} "
        "(or name your own adapter as package.module:ClassName)"
    )
