"""The bad-input catalogue: every input error the public API detects, and docs/errors.md.

``ERRORS`` lists one case per row of the error table in ``docs/errors.md``: an id, a call
that makes the error, the exception type and a regex its message must match.
``BEHAVIOURS`` lists the documented outcomes of odd-but-legal input (no exception).
``test_doc_lists_every_case`` fails when the doc and these lists disagree (a case id missing
on either side, or a different exception type), so the two cannot drift apart.

Device mismatches are made on a CPU-only machine with the ``meta`` device: a tensor on
``meta`` against one on ``cpu`` is what a CUDA tensor against a CPU one is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

import moeflux
from moeflux import cli, gpumode, memory
from moeflux.backends import resolve_backend
from moeflux.expert_tables import ExpertTables
from moeflux.ops import route, run_experts
from moeflux.ops.dispatch import build_dispatch_plan, plan_from_sorted_order
from moeflux.ops.experts.autograd import experts_autograd
from moeflux.ops.experts.triton import experts_triton, experts_triton_tables
from moeflux.ops.grouped_matmul import (
    WeightTable,
    grouped_matmul,
    moe_matmul_ogs,
    moe_matmul_ogs_top1,
)
from tests.distributed import error_cases as ep
from tests.integrations import error_cases as hf

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
# The error cases use CPU tensors (their messages name the device); the behaviours that run
# the Triton kernels use this one (the CPU runs them through Triton's interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# H = 16, D = 8, E = 4 routed experts, k = 2, S = 1 shared expert; T = 3 tokens.
H, D, E, K, S, T = 16, 8, 4, 2, 1, 3
CONFIG = moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=K, num_shared_experts=S)
SEED_CONFIG = {"d_hidden": H, "d_expert": D, "n_routed_experts": E, "n_shared_experts": S, "n_experts_per_token": K}


def lit(text: str) -> str:
    """A regex matching ``text`` literally."""
    return re.escape(text)


def ids_message(lowest: int, highest: int, num_experts: int = E) -> str:
    """The message of an out-of-range expert id (``moeflux.ops.dispatch.check_expert_ids``)."""
    return lit(
        f"expert_ids must lie in [0, {num_experts}) (ids of the {num_experts} routed experts), "
        f"found min {lowest} and max {highest}"
    )


def weights(device: str = "cpu", **overrides: torch.Tensor) -> moeflux.MoEWeights:
    """Random packed weights of ``CONFIG``, with some tensors replaced."""
    packed = moeflux.MoEWeights.random(CONFIG, generator=torch.Generator().manual_seed(0))
    tensors = {"router": packed.router, "gate_up": packed.gate_up, "down": packed.down}
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()} | overrides
    return moeflux.MoEWeights(**tensors)


def x(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*(shape or (T, H)), dtype=dtype).to(device)


def ids(*rows: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``expert_ids [T, k]``; in range by default."""
    return torch.tensor(rows or [[0, 1], [2, 3], [1, 0]], dtype=dtype)


def routing_weights(*shape: int) -> torch.Tensor:
    return torch.full(shape or (T, K), 0.5)


def seed(drop: str | None = None, **replace: object) -> dict:
    """The competition's weight dict of ``CONFIG``, without ``drop`` and with ``replace``
    (keys spelled with ``__`` for ``.``)."""
    out = weights().to_seed_weights()
    if drop is not None:
        del out[drop]
    out.update({key.replace("__", "."): value for key, value in replace.items()})
    return out


def plan():
    return build_dispatch_plan(ids(), E)


def stacked(experts: int = E, k: int = H, n: int = D, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(experts, k, n, dtype=dtype)


def flash(**overrides: object) -> torch.Tensor:
    """``moeflux.flash_expert`` on 3 tokens over 10 experts, some arguments replaced."""
    args = {
        "hidden_states": torch.randn(T, H),
        "down_weights": torch.randn(10, H),
        "up_weights": torch.randn(10, H),
        "indices": torch.tensor([[0, 9], [3, 3], [5, 1]]),
        "routing_weights": torch.rand(T, 2),
        **overrides,
    }
    return moeflux.flash_expert(**args)


def weights64() -> moeflux.MoEWeights:
    packed = weights()
    return moeflux.MoEWeights(packed.router.double(), packed.gate_up.double(), packed.down.double())


def without_triton(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run as if the triton package were not installed."""

    def call():
        with mock.patch("moeflux.backends.triton_available", return_value=False):
            return fn()

    return call


def interpreted(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with ``TRITON_INTERPRET=1``, so ``backend='triton'`` accepts CPU tensors on a
    machine with a GPU too (for cases that fail before any kernel runs)."""

    def call():
        with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
            return fn()

    return call


def triton_on_cpu(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with ``TRITON_INTERPRET`` unset: ``backend='triton'`` on CPU tensors is an error."""

    def call():
        with mock.patch.dict(os.environ):
            os.environ.pop("TRITON_INTERPRET", None)
            return fn()

    return call


def short_of_memory(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with 100 bytes of free device memory and every request checked (the CUDA
    free-memory query patched; no 64 MiB floor), under the interpreter on the CPU."""

    def call():
        with mock.patch.object(memory, "available_bytes", lambda device, at_least=0: 100), \
                mock.patch.object(memory, "CHECK_MIN_BYTES", 0):  # fmt: skip
            return interpreted(fn)()

    return call


def out_of_memory(what: str, required: int, per_token: int) -> str:
    """The message of :func:`moeflux.memory.check_fits` with 100 bytes free on the CPU."""
    return (
        lit(f"{what} needs {required:,} bytes (") + r"[\d.]+" + lit(" GiB) of device memory for its workspace and "
        "outputs, but cpu has 100 bytes (0.00 GiB) free, counting memory PyTorch's caching allocator holds "
        f"unallocated; it takes about {per_token:,} bytes a token: split the batch into chunks that fit")
    )  # fmt: skip


def _experts_memory(training: bool) -> str:
    def peak(tokens):
        return memory.experts_forward_bytes(tokens, H, D, K, E, S, torch.float32, training=training).peak

    what = "the Triton experts forward" + (" (training)" if training else "")
    return out_of_memory(what, peak(T), memory.per_token_bytes(peak, T))


def _experts_backward_out_of_memory() -> None:
    w = weights()
    out = interpreted(lambda: experts_autograd(x().requires_grad_(), ids(), routing_weights(), w.gate_up, w.down, E))()
    short_of_memory(lambda: out.sum().backward())()


def _experts_backward_memory() -> str:
    def peak(tokens):
        return memory.experts_backward_bytes(tokens, H, D, K, E, S, torch.float32).peak

    return out_of_memory("the Triton experts backward", peak(T), memory.per_token_bytes(peak, T))


def _flash_memory(backward: bool = False) -> str:
    def peak(tokens):
        if backward:
            return memory.flash_expert_backward_bytes(tokens, H, 10, 2, torch.float32).peak
        return memory.flash_expert_forward_bytes(tokens, H, 10, 2, torch.float32).peak

    what = "the Triton flash_expert " + ("backward" if backward else "forward")
    return out_of_memory(what, peak(T), memory.per_token_bytes(peak, T))


def _flash_backward_out_of_memory() -> None:
    leaf = torch.randn(T, H, requires_grad=True)
    out = interpreted(lambda: flash(hidden_states=leaf, backend="triton"))()
    short_of_memory(lambda: out.sum().backward())()


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], object]
    error: type[BaseException]
    match: str  # a regex searched in str(exception)


# fmt: off
ERRORS = [
    # moeflux.moe (and MoE.forward, which calls it)
    Case("moe-x-not-tensor", lambda: moeflux.moe([[0.0] * H], weights(), K), TypeError,
         lit("x must be a torch.Tensor, got list")),
    Case("moe-x-rank", lambda: moeflux.moe(x(H), weights(), K), ValueError,
         lit("x must be [T, H] or [B, S, H], got shape [16]")),
    Case("moe-x-rank-4d", lambda: moeflux.moe(x(1, 2, 3, H), weights(), K), ValueError,
         lit("x must be [T, H] or [B, S, H], got shape [1, 2, 3, 16]")),
    Case("moe-x-hidden-size", lambda: moeflux.moe(x(T, H - 1), weights(), K), ValueError,
         lit("x has hidden size 15 but the weights expect 16")),
    Case("moe-x-dtype-unsupported",
         lambda: moeflux.moe(torch.ones(T, H, dtype=torch.int64), weights(), K), TypeError,
         lit("x has dtype torch.int64; supported: float32, float16, bfloat16 (float64 on 'torch')")),
    Case("moe-x-dtype-mismatch", lambda: moeflux.moe(x(dtype=torch.float16), weights(), K), TypeError,
         lit("x has dtype torch.float16 but the weights are torch.float32; cast one to match")),
    Case("moe-x-device-mismatch", lambda: moeflux.moe(x(device="meta"), weights(), K), ValueError,
         lit("x is on meta but the weights are on cpu")),
    Case("moe-top-k-gt-experts", lambda: moeflux.moe(x(), weights(), E + 1), ValueError,
         lit("top_k=5 must be an int in 1..4 (the number of routed experts)")),
    Case("moe-top-k-zero", lambda: moeflux.moe(x(), weights(), 0), ValueError,
         lit("top_k=0 must be an int in 1..4 (the number of routed experts)")),
    Case("moe-top-k-not-int", lambda: moeflux.moe(x(), weights(), 2.0), ValueError,
         lit("top_k=2.0 must be an int in 1..4 (the number of routed experts)")),
    Case("moe-unknown-backend", lambda: moeflux.moe(x(), weights(), K, backend="cuda"), ValueError,
         lit("unknown backend 'cuda'; expected one of ('auto', 'torch', 'triton')")),
    Case("moe-triton-float64",
         interpreted(lambda: moeflux.moe(x(dtype=torch.float64), weights64(), K, backend="triton")), TypeError,
         lit("the Triton routing kernel supports float32/float16/bfloat16 logits, not float64")),
    Case("moe-bad-weights", lambda: moeflux.moe(x(), weights(down=torch.randn(E + S, D, H + 1)), K),
         ValueError, lit("inconsistent MoEWeights: router (4, 16), gate_up (5, 16, 16), down (5, 8, 17)")),
    Case("module-forward-hidden-size", lambda: moeflux.MoE(CONFIG)(x(2, 5, H + 1)), ValueError,
         lit("x has hidden size 17 but the weights expect 16")),
    # MoEConfig
    Case("config-not-positive",
         lambda: moeflux.MoEConfig(hidden_size=0, expert_size=D, num_experts=E, top_k=K), ValueError,
         lit("MoEConfig.hidden_size must be a positive int, got 0")),
    Case("config-not-int",
         lambda: moeflux.MoEConfig(hidden_size=H, expert_size=8.0, num_experts=E, top_k=K), ValueError,
         lit("MoEConfig.expert_size must be a positive int, got 8.0")),
    Case("config-shared-negative",
         lambda: moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=K, num_shared_experts=-1),
         ValueError, lit("MoEConfig.num_shared_experts must be an int >= 0, got -1")),
    Case("config-top-k-gt-experts",
         lambda: moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=E + 1), ValueError,
         lit("MoEConfig.top_k=5 exceeds num_experts=4")),
    Case("config-seed-missing-key",
         lambda: moeflux.MoEConfig.from_seed_config({k: v for k, v in SEED_CONFIG.items()
                                                     if k != "n_experts_per_token"}),
         KeyError, lit("seed config is missing key(s) ['n_experts_per_token']")),
    # MoEWeights.validate (also run by moeflux.moe)
    Case("weights-not-tensor", lambda: weights(router=[[0.0] * H] * E).validate(), TypeError,
         lit("MoEWeights.router must be a torch.Tensor, got list")),
    Case("weights-not-float", lambda: weights(down=torch.zeros(E + S, D, H, dtype=torch.int64)).validate(),
         TypeError, lit("MoEWeights.down must be floating point, got torch.int64")),
    Case("weights-rank", lambda: weights(gate_up=torch.randn(E + S, H * 2 * D)).validate(), ValueError,
         lit("MoEWeights expects router [E, H], gate_up [E+S, H, 2D], down [E+S, D, H]; got "
             "(4, 16), (5, 256), (5, 8, 16)")),
    Case("weights-inconsistent", lambda: weights(gate_up=torch.randn(E + S, H, D)).validate(), ValueError,
         lit("inconsistent MoEWeights: router (4, 16), gate_up (5, 16, 8), down (5, 8, 16); expected "
             "gate_up [E+S, 16, 2D] and down [E+S, D, 16] with E+S >= 4")),
    Case("weights-fewer-experts-than-router", lambda: weights(router=torch.randn(E + S + 1, H)).validate(),
         ValueError, lit("inconsistent MoEWeights: router (6, 16)")),
    Case("weights-mixed-dtypes", lambda: weights(router=weights().router.half()).validate(), TypeError,
         lit("MoEWeights tensors have mixed dtypes ['torch.float16', 'torch.float32']")),
    Case("weights-mixed-devices", lambda: weights(router=weights().router.to("meta")).validate(), ValueError,
         lit("MoEWeights tensors live on different devices ['cpu', 'meta']")),
    # MoEWeights.from_seed_weights, MoE.from_seed_weights
    Case("seed-missing-key", lambda: moeflux.MoEWeights.from_seed_weights(seed("experts.1.2.weight"), CONFIG),
         KeyError, lit("seed weights are missing key 'experts.1.2.weight' (expected shape [8, 16])")),
    Case("seed-missing-shared-key",
         lambda: moeflux.MoEWeights.from_seed_weights(seed("shared_experts.0.weight"), CONFIG), KeyError,
         lit("seed weights are missing key 'shared_experts.0.weight' (expected shape [16, 8])")),
    Case("seed-misshaped-key",
         lambda: moeflux.MoEWeights.from_seed_weights(seed(experts__0__0__weight=torch.randn(D, H)), CONFIG),
         ValueError, lit("seed weight 'experts.0.0.weight' has shape [8, 16], expected [16, 8]")),
    Case("module-seed-missing-key", lambda: moeflux.MoE.from_seed_weights(seed("router.weight"), SEED_CONFIG),
         KeyError, lit("seed weights are missing key 'router.weight' (expected shape [4, 16])")),
    Case("module-seed-bad-config",
         lambda: moeflux.MoE.from_seed_weights(seed(), {k: v for k, v in SEED_CONFIG.items() if k != "d_hidden"}),
         KeyError, lit("seed config is missing key(s) ['d_hidden']")),
    # MoE
    Case("module-weights-mismatch",
         lambda: moeflux.MoE(moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E + 1, top_k=K,
                                               num_shared_experts=S), weights()),
         ValueError, r"weights of shapes torch\.Size\(\[5, 16, 16\]\) do not match MoEConfig\(hidden_size=16, "),
    # load_balancing_loss / router_z_loss: see "Not checked" in docs/errors.md.
    # moeflux.ops.route
    Case("route-logits-rank", lambda: route(torch.randn(E), 1), ValueError,
         lit("route expects logits [T, E], got shape [4]")),
    Case("route-logits-not-float", lambda: route(torch.ones(T, E, dtype=torch.int64), 1), TypeError,
         lit("route expects floating-point logits, got torch.int64")),
    Case("route-top-k-gt-experts", lambda: route(torch.randn(T, E), E + 1), ValueError,
         lit("top_k=5 must be in 1..4 (the number of experts)")),
    Case("route-top-k-zero", lambda: route(torch.randn(T, E), 0), ValueError,
         lit("top_k=0 must be in 1..4 (the number of experts)")),
    Case("route-unknown-backend", lambda: route(torch.randn(T, E), 1, backend="cuda"), ValueError,
         lit("unknown routing backend 'cuda'; expected 'torch' or 'triton'")),
    Case("route-triton-float64", lambda: route(torch.randn(T, E, dtype=torch.float64), 1, backend="triton"),
         TypeError, lit("the Triton routing kernel supports float32/float16/bfloat16 logits, not float64")),
    # routing variants and load balancing: moeflux.RouterConfig, expert_bias, balance losses, moeflux.balancing
    Case("router-scoring-unknown", lambda: moeflux.RouterConfig(scoring="tanh"), ValueError,
         lit("RouterConfig.scoring must be 'softmax' or 'sigmoid', got 'tanh'")),
    Case("router-flag-not-bool", lambda: moeflux.RouterConfig(normalize_topk=1), TypeError,
         lit("RouterConfig.normalize_topk must be a bool, got 1")),
    Case("router-groups-not-positive", lambda: moeflux.RouterConfig(num_groups=0), ValueError,
         lit("RouterConfig.num_groups must be a positive int, got 0")),
    Case("router-topk-groups-gt-groups", lambda: moeflux.RouterConfig(num_groups=2, topk_groups=3), ValueError,
         lit("RouterConfig.topk_groups=3 exceeds num_groups=2")),
    Case("router-softmax-after-topk-sigmoid",
         lambda: moeflux.RouterConfig(scoring="sigmoid", softmax_after_topk=True), ValueError,
         lit("RouterConfig.softmax_after_topk weights by a softmax over the chosen logits and needs "
             "scoring='softmax', got scoring='sigmoid'")),
    Case("router-softmax-after-topk-normalize",
         lambda: moeflux.RouterConfig(softmax_after_topk=True, normalize_topk=True), ValueError,
         lit("RouterConfig.softmax_after_topk already gives weights that sum to 1; leave normalize_topk off")),
    Case("router-scaling-factor", lambda: moeflux.RouterConfig(scaling_factor=0.0), ValueError,
         lit("RouterConfig.scaling_factor must be a finite number > 0, got 0.0")),
    Case("router-jitter-range", lambda: moeflux.RouterConfig(jitter=1.0), ValueError,
         lit("RouterConfig.jitter must be a number in [0, 1), got 1.0")),
    Case("router-capacity-factor", lambda: moeflux.RouterConfig(capacity_factor=-1.0), ValueError,
         lit("RouterConfig.capacity_factor must be None or a finite number > 0, got -1.0")),
    Case("router-experts-not-divisible",
         lambda: moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=6, top_k=K,
                                   router=moeflux.RouterConfig(num_groups=4)),
         ValueError, lit("num_experts=6 is not divisible by RouterConfig.num_groups=4")),
    Case("router-top-k-gt-kept",
         lambda: moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=8, top_k=3,
                                   router=moeflux.RouterConfig(num_groups=4, topk_groups=1)),
         ValueError, lit("top_k=3 exceeds the 2 experts of the topk_groups=1 groups kept per token "
                         "(num_experts=8, num_groups=4)")),
    Case("config-router-type",
         lambda: moeflux.MoEConfig(hidden_size=H, expert_size=D, num_experts=E, top_k=K, router={}), TypeError,
         lit("MoEConfig.router must be a RouterConfig, got dict")),
    Case("moe-router-type", lambda: moeflux.moe(x(), weights(), K, router={"scoring": "sigmoid"}), TypeError,
         lit("router must be a RouterConfig, got dict")),
    Case("moe-expert-bias-missing",
         lambda: moeflux.moe(x(), weights(), K, router=moeflux.RouterConfig(expert_bias=True)), ValueError,
         lit("router.expert_bias is on but no expert_bias tensor was given")),
    Case("moe-expert-bias-unexpected", lambda: moeflux.moe(x(), weights(expert_bias=torch.zeros(E)), K),
         ValueError, lit("an expert_bias tensor was given but router.expert_bias is off; turn it on to use it")),
    Case("module-expert-bias-unexpected", lambda: moeflux.MoE(CONFIG, weights(expert_bias=torch.zeros(E))),
         ValueError, lit("the weights carry an expert_bias but config.router.expert_bias is off; turn it on to "
                         "use it")),
    Case("weights-expert-bias", lambda: weights(expert_bias=torch.zeros(E, dtype=torch.float16)).validate(),
         ValueError, lit("MoEWeights.expert_bias must be None or float32 [E=4], got torch.float16 [4]")),
    Case("weights-expert-bias-device", lambda: weights(expert_bias=torch.zeros(E, device="meta")).validate(),
         ValueError, lit("MoEWeights.expert_bias is on meta but the weights are on cpu")),
    Case("route-router-type", lambda: route(torch.randn(T, E), 1, router="sigmoid"), TypeError,
         lit("router must be a RouterConfig, got str")),
    Case("route-router-for-experts",
         lambda: route(torch.randn(T, E), 1, router=moeflux.RouterConfig(num_groups=3)), ValueError,
         lit("num_experts=4 is not divisible by RouterConfig.num_groups=3")),
    Case("route-expert-bias-not-tensor",
         lambda: route(torch.randn(T, E), 1, router=moeflux.RouterConfig(expert_bias=True), expert_bias=[0.0] * E),
         TypeError, lit("expert_bias must be a torch.Tensor, got list")),
    Case("route-expert-bias-shape",
         lambda: route(torch.randn(T, E), 1, router=moeflux.RouterConfig(expert_bias=True),
                       expert_bias=torch.zeros(E + 1)),
         ValueError, lit("expert_bias must be float32 [4] (one per routed expert), got torch.float32 [5]")),
    Case("route-expert-bias-device",
         lambda: route(torch.randn(T, E), 1, router=moeflux.RouterConfig(expert_bias=True),
                       expert_bias=torch.zeros(E, device="meta")),
         ValueError, lit("expert_bias is on meta but the logits are on cpu")),
    Case("loss-sequence-length",
         lambda: moeflux.sequence_balance_loss(torch.rand(T, E), ids(), sequence_length=0), ValueError,
         lit("sequence_length must be a positive int, got 0")),
    Case("loss-sequence-partial",
         lambda: moeflux.sequence_balance_loss(torch.rand(T, E), ids(), sequence_length=2), ValueError,
         lit("3 tokens are not a whole number of sequences of length 2")),
    Case("bias-updater-bias", lambda: moeflux.ExpertBiasUpdater(torch.zeros(E, dtype=torch.float16)), ValueError,
         lit("ExpertBiasUpdater needs a float32 [E] expert_bias tensor, got torch.float16 [4]")),
    Case("bias-updater-rate", lambda: moeflux.ExpertBiasUpdater(torch.zeros(E), rate=0), ValueError,
         lit("ExpertBiasUpdater rate must be a finite number > 0, got 0")),
    Case("bias-updater-counts", lambda: moeflux.ExpertBiasUpdater(torch.zeros(E)).accumulate(torch.ones(E + 1)),
         ValueError, lit("tokens_per_expert must be a tensor [4] (one count per expert), got [5]")),
    Case("monitor-not-positive", lambda: moeflux.ExpertUsageMonitor(0), ValueError,
         lit("ExpertUsageMonitor num_experts must be a positive int, got 0")),
    Case("monitor-momentum", lambda: moeflux.ExpertUsageMonitor(E, momentum=1.0), ValueError,
         lit("ExpertUsageMonitor momentum must be a number in [0, 1), got 1.0")),
    Case("monitor-counts", lambda: moeflux.ExpertUsageMonitor(E).update(torch.ones(E, 1)), ValueError,
         lit("tokens_per_expert must be a tensor [4] (one count per expert), got [4, 1]")),
    # moeflux.ops.dispatch
    Case("plan-ids-rank", lambda: build_dispatch_plan(torch.zeros(4, dtype=torch.int64), E), ValueError,
         lit("expert_ids must be [T, k], got shape [4]")),
    Case("plan-ids-not-int", lambda: build_dispatch_plan(torch.zeros(4, 1), E), TypeError,
         lit("expert_ids must be an integer tensor, got torch.float32")),
    Case("plan-bad-sizes", lambda: build_dispatch_plan(ids(), 0), ValueError,
         lit("need num_experts >= 1, num_shared_experts >= 0, block_m >= 1; got 0, 0, 64")),
    Case("plan-ids-too-large", lambda: build_dispatch_plan(ids([0, 1], [2, 4]), E), IndexError,
         ids_message(0, 4)),
    Case("plan-ids-negative", lambda: build_dispatch_plan(ids([0, -1], [2, 3]), E, num_shared_experts=S),
         IndexError, ids_message(-1, 3)),
    Case("sorted-plan-partial-token",
         lambda: plan_from_sorted_order(torch.tensor([2, 3]), torch.tensor([0, 2, 5]), torch.arange(5), top_k=2),
         ValueError, lit("5 sorted rows are not a whole number of tokens of top_k=2")),
    Case("sorted-plan-offsets-length",
         lambda: plan_from_sorted_order(torch.tensor([2, 2]), torch.tensor([0, 2]), torch.arange(4)),
         ValueError, lit("expert_offsets must have one more entry than tokens_per_expert, got 2 and 2")),
    # moeflux.ops.grouped_matmul.grouped_matmul
    Case("gmm-weight-rank", lambda: grouped_matmul(x(), torch.randn(H, D), plan(), gather=True), ValueError,
         lit("grouped_matmul expects weight [E', K, N], got [16, 8]")),
    Case("gmm-swiglu-odd-width",
         lambda: grouped_matmul(x(), stacked(n=2 * D - 1), plan(), gather=True, swiglu=True), ValueError,
         lit("swiglu needs a packed gate|up weight of even width, got 15")),
    Case("gmm-x-rank", lambda: grouped_matmul(x(T, 1, H), stacked(), plan(), gather=True), ValueError,
         lit("grouped_matmul expects x [rows, K], got [3, 1, 16]")),
    Case("gmm-table-matrices",
         lambda: grouped_matmul(x(), WeightTable.from_stacked(stacked()), plan(), gather=True, swiglu=True),
         ValueError, lit("swiglu reads two matrices per expert (gate, up), a plain GEMM one; got a table of "
                         "4 experts x 1 [16, 8] matrices")),
    Case("gmm-dtype-mismatch", lambda: grouped_matmul(x(dtype=torch.float16), stacked(), plan(), gather=True),
         TypeError, lit("x is torch.float16 but weight is torch.float32; cast one to match")),
    Case("gmm-dtype-unsupported",
         lambda: grouped_matmul(x(dtype=torch.float64), stacked(dtype=torch.float64), plan(), gather=True),
         TypeError, lit("grouped_matmul supports float32, float16 and bfloat16, got torch.float64")),
    Case("gmm-x-rows", lambda: grouped_matmul(x(T + 1, H), stacked(), plan(), gather=True), ValueError,
         lit("x has 4 rows but the plan has 3 tokens (gather)")),
    Case("gmm-x-sorted-rows", lambda: grouped_matmul(x(T, H), stacked(), plan()), ValueError,
         lit("x has 3 rows but the plan has 6 sorted rows")),
    Case("gmm-weight-experts", lambda: grouped_matmul(x(), stacked(experts=E - 1), plan(), gather=True),
         ValueError, lit("weight [3, 16, 8] does not match 4 experts and K=16")),
    Case("gmm-row-scale",
         lambda: grouped_matmul(x(), stacked(), plan(), gather=True, row_scale=torch.ones(T * K).half()),
         ValueError, lit("row_scale must be float32 [6], got torch.float16 [6]")),
    Case("gmm-out", lambda: grouped_matmul(x(), stacked(), plan(), gather=True, out=torch.empty(T * K, D + 1)),
         ValueError, lit("out must be torch.float32 [6, 8], got torch.float32 [6, 9]")),
    Case("gmm-device-mismatch", lambda: grouped_matmul(x(device="meta"), stacked(), plan(), gather=True),
         ValueError, lit("x, weight and the plan live on different devices ['cpu', 'meta']")),
    Case("gmm-unknown-backend", lambda: grouped_matmul(x(), stacked(), plan(), gather=True, backend="cuda"),
         ValueError, lit("unknown grouped_matmul backend 'cuda'; expected 'triton' or 'torch'")),
    Case("gmm-torch-table",
         lambda: grouped_matmul(x(), WeightTable.from_stacked(stacked()), plan(), gather=True, backend="torch"),
         TypeError, lit("the torch backend reads a stacked weight tensor, not a WeightTable")),
    # moe_matmul_ogs, moe_matmul_ogs_top1
    Case("ogs-shapes",
         lambda: moe_matmul_ogs(x(), stacked(), torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 2, 3, 3]),
                                torch.arange(T + 1)),
         ValueError, lit("moe_matmul_ogs expects A [T, K], W [E, K, N], sorted_to_orig_token_idx [T]; got "
                         "[3, 16], [4, 16, 8], [4]")),
    Case("ogs-counts-offsets",
         lambda: moe_matmul_ogs(x(), stacked(), torch.tensor([1, 1, 1]), torch.tensor([0, 1, 2, 3]),
                                torch.arange(T)),
         ValueError, lit("expected expert_token_counts [4] and expert_token_offsets [5], got [3] and [4]")),
    Case("ogs-top1-shapes", lambda: moe_matmul_ogs_top1(x(), torch.randn(H, D), torch.zeros(T, dtype=torch.int64)),
         ValueError, lit("moe_matmul_ogs_top1 expects A [T, K] and W [E, K, N]; got [3, 16] and [16, 8]")),
    Case("ogs-top1-ids-shape", lambda: moe_matmul_ogs_top1(x(), stacked(), ids()), ValueError,
         lit("expert_ids must be [T] = [3], got [3, 2]")),
    Case("ogs-top1-ids-too-large", lambda: moe_matmul_ogs_top1(x(), stacked(), torch.tensor([0, 4, 1])),
         IndexError, ids_message(0, 4)),
    Case("ogs-top1-ids-negative", lambda: moe_matmul_ogs_top1(x(), stacked(), torch.tensor([0, -2, 1])),
         IndexError, ids_message(-2, 1)),
    # WeightTable
    Case("table-stacked-shape", lambda: WeightTable.from_stacked(torch.randn(E, H, 2 * D + 1), swiglu=True),
         ValueError, lit("expected a stacked weight [E', K, N] (even N for a gate|up swiglu weight), got "
                         "[4, 16, 17]")),
    Case("table-strides", lambda: WeightTable.from_stacked(torch.randn(E, H, D, 2)[..., 0]), ValueError,
         lit("the grouped matmul reads weights with unit stride along K or N; got strides (16, 2) for a "
             "[K, N] matrix: pass .contiguous()")),
    Case("table-no-matrices", lambda: WeightTable.from_matrices([]), ValueError,
         lit("from_matrices needs at least one expert with at least one matrix")),
    Case("table-matrix-rank", lambda: WeightTable.from_matrices([(torch.randn(H),)]), ValueError,
         lit("matrices must be 2-D [K, N], got [16]")),
    Case("table-matrix-count",
         lambda: WeightTable.from_matrices([(torch.randn(H, D), torch.randn(H, D)), (torch.randn(H, D),)]),
         ValueError, lit("expert 1 has 1 matrices, expert 0 has 2")),
    Case("table-matrix-device",
         lambda: WeightTable.from_matrices([(torch.randn(H, D),), (torch.randn(H, D, device="meta"),)]),
         ValueError, lit("matrix 0 of expert 1 is torch.float32 [16, 8] with strides (8, 1) on meta; expected "
                         "torch.float32 [16, 8] on cpu")),
    # ExpertTables
    Case("tables-packed-shape", lambda: ExpertTables.from_packed(stacked(n=2 * D), stacked(k=D, n=H), E + 1),
         ValueError, lit("expected gate_up [E+S, H, 2D] and down [E+S, D, H] with E+S >= num_routed=5 >= 1; "
                         "got [4, 16, 16] and [4, 8, 16]")),
    Case("tables-packed-device",
         lambda: ExpertTables.from_packed(stacked(n=2 * D), stacked(k=D, n=H).to("meta"), E), ValueError,
         lit("gate_up is torch.float32 on cpu but down is torch.float32 on meta")),
    Case("tables-seed-missing-key",
         lambda: ExpertTables.from_seed_weights(seed("experts.3.1.weight"), CONFIG, dtype=torch.float32,
                                                device="cpu"),
         KeyError, lit("seed weights are missing key 'experts.3.1.weight' (expected shape [16, 8])")),
    Case("tables-seed-not-tensor",
         lambda: ExpertTables.from_seed_weights(seed(experts__0__0__weight=[[0.0]]), CONFIG, dtype=torch.float32,
                                                device="cpu"),
         TypeError, lit("seed weight 'experts.0.0.weight' must be a torch.Tensor, got list")),
    Case("tables-seed-misshaped-key",
         lambda: ExpertTables.from_seed_weights(seed(shared_experts__2__weight=torch.randn(H, D)), CONFIG,
                                                dtype=torch.float32, device="cpu"),
         ValueError, lit("seed weight 'shared_experts.2.weight' has shape [16, 8], expected [8, 16]")),
    Case("tables-seed-dtype",
         lambda: ExpertTables.from_seed_weights(seed(), CONFIG, dtype=torch.float16, device="cpu"), TypeError,
         lit("seed weight 'experts.0.0.weight' is torch.float32, expected torch.float16")),
    Case("tables-seed-device",
         lambda: ExpertTables.from_seed_weights(seed(), CONFIG, dtype=torch.float32, device="meta"), ValueError,
         lit("seed weight 'experts.0.0.weight' is on cpu, expected meta")),
    Case("tables-seed-strides",
         lambda: ExpertTables.from_seed_weights(seed(experts__0__2__weight=torch.randn(H, D).t()), CONFIG,
                                                dtype=torch.float32, device="cpu"),
         ValueError, lit("seed weight 'experts.0.2.weight' has strides (1, 8): its last dimension must be "
                         "contiguous (stride 1); pass weights[key].contiguous()")),
    Case("tables-seed-gate-up-strides",
         lambda: ExpertTables.from_seed_weights(seed(experts__0__1__weight=torch.randn(H, 2 * D)[:, :D]), CONFIG,
                                                dtype=torch.float32, device="cpu"),
         ValueError, lit("seed weights 'experts.0.0.weight' and 'experts.0.1.weight' have strides (8, 1) and "
                         "(16, 1); they must match")),
    # moeflux.ops.run_experts
    Case("run-experts-x-shape", lambda: run_experts(x(T, H + 1), ids(), routing_weights(), weights()), ValueError,
         lit("x must be [T, H=16], got shape [3, 17]")),
    Case("run-experts-ids-shape",
         lambda: run_experts(x(), ids()[:2], routing_weights(), weights()), ValueError,
         lit("expected expert_ids and expert_weights [T=3, k], got [2, 2] and [3, 2]")),
    Case("run-experts-weights-shape",
         lambda: run_experts(x(), ids(), routing_weights(T, K + 1), weights()), ValueError,
         lit("expected expert_ids and expert_weights [T=3, k], got [3, 2] and [3, 3]")),
    Case("run-experts-ids-not-int",
         lambda: run_experts(x(), ids().float(), routing_weights(), weights()), TypeError,
         lit("expert_ids must be an integer tensor, got torch.float32")),
    Case("run-experts-device-mismatch",
         lambda: run_experts(x(), ids(), routing_weights().to("meta"), weights()), ValueError,
         lit("all inputs must be on one device, got x on cpu, expert_ids on cpu, expert_weights on meta, "
             "weights on cpu")),
    Case("run-experts-ids-too-large",
         lambda: run_experts(x(), ids([0, 1], [4, 2], [1, 0]), routing_weights(), weights(), check_ids=True),
         IndexError, ids_message(0, 4)),
    Case("run-experts-ids-negative",
         interpreted(lambda: run_experts(x(), ids([0, 1], [-1, 2], [1, 0]), routing_weights(), weights(),
                                         backend="triton", check_ids=True)),
         IndexError, ids_message(-1, 2)),
    Case("run-experts-unknown-backend",
         lambda: run_experts(x(), ids(), routing_weights(), weights(), backend="cuda"), ValueError,
         lit("unknown experts backend 'cuda'")),
    # moeflux.ops.experts.triton.experts_triton / experts_triton_tables
    Case("experts-triton-x-rank",
         lambda: experts_triton(x(T, 1, H), ids(), routing_weights(), weights().gate_up, weights().down, E),
         ValueError, lit("x must be [T, H], got shape [3, 1, 16]")),
    Case("experts-triton-ids-shape",
         lambda: experts_triton(x(), ids()[:, :1], routing_weights(), weights().gate_up, weights().down, E),
         ValueError, lit("expected expert_ids and expert_weights [T=3, k], got [3, 1] and [3, 2]")),
    Case("experts-triton-weights-shape",
         lambda: experts_triton(x(), ids(), routing_weights(T, K, 1), weights().gate_up, weights().down, E),
         ValueError, lit("expected expert_ids and expert_weights [T=3, k], got [3, 2] and [3, 2, 1]")),
    Case("experts-triton-hidden-size",
         lambda: experts_triton(x(T, H + 1), ids(), routing_weights(), weights().gate_up, weights().down, E),
         ValueError, lit("x has hidden size 17 but the experts' weights expect 16")),
    Case("experts-triton-num-routed",
         lambda: experts_triton(x(), ids(), routing_weights(), weights().gate_up, weights().down, E + S + 1),
         ValueError, lit("expected gate_up [E+S, H, 2D] and down [E+S, D, H] with E+S >= num_routed=6 >= 1; "
                         "got [5, 16, 16] and [5, 8, 16]")),
    Case("experts-triton-ids-not-int",
         lambda: experts_triton(x(), ids().float(), routing_weights(), weights().gate_up, weights().down, E),
         TypeError, lit("expert_ids must be an integer tensor, got torch.float32")),
    Case("experts-triton-ids-too-large",
         lambda: experts_triton(x(), ids([0, 1], [2, 3], [1, 7]), routing_weights(), weights().gate_up,
                                weights().down, E),
         IndexError, ids_message(0, 7)),
    Case("experts-triton-ids-shared",  # an id of a shared expert (E .. E+S-1) is out of range too
         lambda: experts_triton(x(), ids([0, 1], [2, 3], [1, E]), routing_weights(), weights().gate_up,
                                weights().down, E),
         IndexError, ids_message(0, 4)),
    Case("experts-triton-ids-negative",
         lambda: experts_triton_tables(x(), ids([0, 1], [2, -3], [1, 0], dtype=torch.int32), routing_weights(),
                                       weights().expert_tables()),
         IndexError, ids_message(-3, 2)),
    Case("experts-triton-dtype-mismatch",
         lambda: experts_triton(x(dtype=torch.float16), ids(), routing_weights(), weights().gate_up,
                                weights().down, E),
         TypeError, lit("x is torch.float16 but weight is torch.float32; cast one to match")),
    Case("experts-triton-device-mismatch",
         lambda: experts_triton(x(device="meta"), ids(), routing_weights(), weights().gate_up, weights().down, E),
         ValueError, lit("all inputs must be on one device, got x on meta, expert_ids on cpu, expert_weights on "
                         "cpu, weights on cpu")),
    # moeflux.ops.experts.autograd.experts_autograd
    Case("experts-autograd-x-rank",
         lambda: experts_autograd(x(H), ids(), routing_weights(), weights().gate_up, weights().down, E),
         ValueError, lit("expected x [T, H], gate_up [E+S, H, 2D] and down [E+S, D, H]; got [16], "
                         "[5, 16, 16] and [5, 8, 16]")),
    Case("experts-autograd-ids-shape",
         lambda: experts_autograd(x(), ids()[:2], routing_weights(), weights().gate_up, weights().down, E),
         ValueError, lit("expected expert_ids and expert_weights [T=3, k], got [2, 2] and [3, 2]")),
    Case("experts-autograd-weights-shape",
         lambda: experts_autograd(x(), ids(), routing_weights(T, 1), weights().gate_up, weights().down, E),
         ValueError, lit("expected expert_ids and expert_weights [T=3, k], got [3, 2] and [3, 1]")),
    Case("experts-autograd-weight-shapes",
         lambda: experts_autograd(x(), ids(), routing_weights(), weights().gate_up[:, :, :D], weights().down, E),
         ValueError, lit("expected gate_up [E+S, 16, 2D] and down [E+S, D, 16] with E+S >= num_routed=4; got "
                         "[5, 16, 8] and [5, 8, 16]")),
    Case("experts-autograd-ids-too-large",
         lambda: experts_autograd(x(), ids([0, 1], [2, 3], [9, 0]), routing_weights(), weights().gate_up,
                                  weights().down, E),
         IndexError, ids_message(0, 9)),
    Case("experts-autograd-ids-negative",
         lambda: experts_autograd(x(), ids([0, 1], [2, 3], [-1, 0]), routing_weights(), weights().gate_up,
                                  weights().down, E),
         IndexError, ids_message(-1, 3)),
    Case("experts-autograd-device-mismatch",
         lambda: experts_autograd(x(), ids(), routing_weights(), weights().gate_up, weights().down.to("meta"), E),
         ValueError, lit("all inputs must be on one device, got x on cpu, expert_ids on cpu, expert_weights on "
                         "cpu, gate_up on cpu, down on meta")),
    # moeflux.flash_expert
    Case("flash-not-tensor", lambda: flash(indices=[[0, 1]] * T), TypeError,
         lit("flash_expert: indices must be a torch.Tensor, got list")),
    Case("flash-rank", lambda: flash(hidden_states=torch.randn(1, T, H)), ValueError,
         lit("flash_expert: hidden_states must be 2-D, got shape [1, 3, 16]")),
    Case("flash-pool-shape", lambda: flash(up_weights=torch.randn(9, H)), ValueError,
         lit("flash_expert: down_weights and up_weights must both be [E, 16] (H from hidden_states [3, 16]), "
             "got [10, 16] and [9, 16]")),
    Case("flash-indices-tokens", lambda: flash(indices=torch.zeros(T + 1, 2, dtype=torch.int64)), ValueError,
         lit("flash_expert: indices [4, 2] must be [T, K] with T = 3 tokens")),
    Case("flash-routing-weights-shape", lambda: flash(routing_weights=torch.rand(T, 3)), ValueError,
         lit("flash_expert: routing_weights [3, 3] must match indices [3, 2]")),
    Case("flash-dtype-unsupported",
         lambda: flash(hidden_states=torch.ones(T, H, dtype=torch.int32), down_weights=torch.ones(10, H).int(),
                       up_weights=torch.ones(10, H).int()),
         TypeError, lit("flash_expert: hidden_states has dtype torch.int32; supported: (torch.float32, "
                        "torch.float16, torch.bfloat16, torch.float64)")),
    Case("flash-dtype-mismatch", lambda: flash(down_weights=torch.randn(10, H).half()), TypeError,
         lit("flash_expert: hidden_states, down_weights and up_weights must share a dtype, got torch.float32, "
             "torch.float16 and torch.float32")),
    Case("flash-indices-dtype", lambda: flash(indices=torch.zeros(T, 2, dtype=torch.int16)), TypeError,
         lit("flash_expert: indices must be int64 (or int32), got torch.int16")),
    Case("flash-routing-weights-dtype", lambda: flash(routing_weights=torch.ones(T, 2, dtype=torch.int64)),
         TypeError, lit("flash_expert: routing_weights must be floating point, got torch.int64")),
    Case("flash-device-mismatch", lambda: flash(hidden_states=torch.randn(T, H, device="meta")), ValueError,
         lit("flash_expert: all inputs must be on one device, got hidden_states on meta, down_weights on cpu, "
             "up_weights on cpu, indices on cpu, routing_weights on cpu")),
    Case("flash-indices-too-large", lambda: flash(indices=torch.tensor([[0, 10], [3, 3], [5, 1]])), IndexError,
         lit("flash_expert: indices must lie in [0, 10) (num_experts = down_weights.shape[0]), found min 0 "
             "and max 10")),
    Case("flash-indices-negative", lambda: flash(indices=torch.tensor([[0, 9], [-1, 3], [5, 1]])), IndexError,
         lit("flash_expert: indices must lie in [0, 10) (num_experts = down_weights.shape[0]), found min -1 "
             "and max 9")),
    Case("flash-unknown-backend", lambda: flash(backend="cuda"), ValueError,
         lit("unknown backend 'cuda'; expected one of ('auto', 'torch', 'triton')")),
    Case("flash-triton-float64",
         lambda: flash(hidden_states=torch.randn(T, H).double(), down_weights=torch.randn(10, H).double(),
                       up_weights=torch.randn(10, H).double(), backend="triton"),
         TypeError, lit("the Triton flash_expert kernels support float32/float16/bfloat16, not float64")),
    # moeflux.FlashExpert
    Case("flash-layer-not-positive", lambda: moeflux.FlashExpert(H, 16, 0), ValueError,
         lit("FlashExpert: top_k must be a positive int, got 0")),
    Case("flash-layer-not-square", lambda: moeflux.FlashExpert(H, 15, 2), ValueError,
         lit("FlashExpert: num_experts=15 must be a perfect square (product keys)")),
    Case("flash-layer-top-k-gt-experts", lambda: moeflux.FlashExpert(H, 16, 17), ValueError,
         lit("FlashExpert: top_k=17 exceeds num_experts=16")),
    Case("flash-layer-query-dim", lambda: moeflux.FlashExpert(H, 16, 2, query_dim=7), ValueError,
         lit("FlashExpert: query_dim must be an even int >= 2, got 7")),
    Case("flash-layer-input-shape", lambda: moeflux.FlashExpert(H, 16, 2)(x(T, H + 1)), ValueError,
         lit("FlashExpert expects [T, 16] or [B, S, 16], got [3, 17]")),
    # moeflux.memory: the device-memory check before launching (free memory patched to 100 bytes)
    Case("memory-experts-forward",
         short_of_memory(lambda: experts_triton(x(), ids(), routing_weights(), weights().gate_up, weights().down, E)),
         torch.OutOfMemoryError, _experts_memory(training=False)),
    Case("memory-experts-training-forward",
         short_of_memory(lambda: experts_autograd(x().requires_grad_(), ids(), routing_weights(), weights().gate_up,
                                                  weights().down, E)),
         torch.OutOfMemoryError, _experts_memory(training=True)),
    Case("memory-experts-backward", _experts_backward_out_of_memory, torch.OutOfMemoryError,
         _experts_backward_memory()),
    Case("memory-flash-expert", short_of_memory(lambda: flash(backend="triton")), torch.OutOfMemoryError,
         _flash_memory()),
    Case("memory-flash-expert-backward", _flash_backward_out_of_memory, torch.OutOfMemoryError,
         _flash_memory(backward=True)),
    # moeflux.gpumode.custom_kernel
    Case("gpumode-config-missing-key",
         lambda: gpumode.custom_kernel((x(1, T, H), seed(), {k: v for k, v in SEED_CONFIG.items()
                                                             if k != "d_expert"})),
         KeyError, lit("seed config is missing key(s) ['d_expert']")),
    Case("gpumode-missing-key", lambda: gpumode.custom_kernel((x(1, T, H), seed("experts.2.0.weight"), SEED_CONFIG)),
         KeyError, lit("seed weights are missing key 'experts.2.0.weight' (expected shape [16, 8])")),
    Case("gpumode-misshaped-key",
         lambda: gpumode.custom_kernel((x(1, T, H), seed(router__weight=torch.randn(E, H + 1)), SEED_CONFIG)),
         ValueError, lit("seed weight 'router.weight' has shape [4, 17], expected [4, 16]")),
    Case("gpumode-device-mismatch", lambda: gpumode.custom_kernel((x(1, T, H, device="meta"), seed(), SEED_CONFIG)),
         ValueError, lit("x is on meta but the weights are on cpu")),
    Case("gpumode-triton-x-shape",
         interpreted(lambda: gpumode.custom_kernel((x(T, H + 1), seed(), SEED_CONFIG), backend="triton")),
         ValueError,
         lit("x must be [T, 16] or [B, S, 16], got [3, 17]")),
    Case("gpumode-triton-missing-key",
         interpreted(lambda: gpumode.custom_kernel((x(1, T, H), seed("experts.0.2.weight"), SEED_CONFIG),
                                                   backend="triton")),
         KeyError, lit("seed weights are missing key 'experts.0.2.weight' (expected shape [8, 16])")),
    Case("gpumode-triton-device-mismatch",
         interpreted(lambda: gpumode.custom_kernel(
             (x(1, T, H), seed(router__weight=torch.randn(E, H, device="meta")), SEED_CONFIG), backend="triton")),
         ValueError, lit("seed weight 'router.weight' is on meta, expected cpu")),
    # moeflux.distributed (expert parallelism; calls in tests/distributed/error_cases.py)
    Case("ep-partition-not-positive", ep.partition_not_positive, ValueError,
         lit("ExpertPartition.num_experts must be a positive int, got 0")),
    Case("ep-partition-too-few-experts", ep.partition_too_few_experts, ValueError,
         lit("expert parallelism over 4 ranks needs num_experts >= 4 (every rank owns at least one expert), "
             "got num_experts=3")),
    Case("ep-partition-rank", ep.partition_rank, ValueError, lit("rank=2 is not in 0..1")),
    Case("ep-shard-partition-experts", ep.shard_partition_experts, ValueError,
         lit("the weights hold 4 routed experts but the partition splits 6")),
    Case("ep-shard-not-this-rank", ep.shard_not_this_rank, ValueError,
         lit("rank 1 of 2 owns routed experts 2..3 of 4, but the shard holds 2 expert(s) from 0 with a router "
             "of 4 rows")),
    Case("ep-shard-shape", ep.shard_shape, ValueError,
         lit("ExpertShard.shared_down has shape [1, 8, 17], expected [1, 8, 16] (router [4, 16], down [2, 8, 16])")),
    Case("ep-shard-dtype-device", ep.shard_dtype_device, ValueError,
         lit("ExpertShard tensors must share one dtype and device, got torch.float64 on cpu, torch.float32 on cpu")),
    Case("ep-no-process-group", ep.no_process_group, RuntimeError,
         lit("expert parallelism needs torch.distributed initialised (torch.distributed.init_process_group)")),
    Case("ep-plan-world-size", ep.plan_world_size, ValueError,
         lit("the partition is over 2 ranks but the group has 4")),
    Case("ep-dispatch-shapes", ep.dispatch_shapes, ValueError,
         lit("expected x [T=3, H] and expert_weights [T, k=2], got [3, 16] and [3, 3]")),
    Case("ep-combine-shape", ep.combine_shape, ValueError, lit("expected expert_out [R=4, H], got [5, 16]")),
    Case("ep-wait-twice", ep.wait_twice, RuntimeError, lit("this all-to-all was already waited for")),
    Case("ep-x-not-tensor", ep.layer_x_not_tensor, TypeError, lit("x must be a torch.Tensor, got list")),
    Case("ep-x-rank", ep.layer_x_rank, ValueError, lit("x must be [T, H] or [B, S, H], got shape [16]")),
    Case("ep-x-hidden-size", ep.layer_x_hidden_size, ValueError,
         lit("x has hidden size 15 but the weights expect 16")),
    Case("ep-x-dtype-unsupported", ep.layer_x_dtype_unsupported, TypeError,
         lit("x has dtype torch.int64; supported: float32, float16, bfloat16 (float64 on 'torch')")),
    Case("ep-x-dtype-mismatch", ep.layer_x_dtype_mismatch, TypeError,
         lit("x has dtype torch.float16 but the weights are torch.float32; cast one to match")),
    Case("ep-x-device-mismatch", ep.layer_x_device_mismatch, ValueError,
         lit("x is on meta but the weights are on cpu")),
    Case("ep-top-k", ep.layer_top_k, ValueError, lit("top_k=5 must be an int in 1..4 (the number of routed experts)")),
    Case("ep-module-weights-mismatch", ep.module_weights_mismatch, ValueError,
         lit("weights of shapes torch.Size([7, 16, 16]) do not match MoEConfig(hidden_size=16")),
    Case("ep-module-expert-bias-off", ep.module_expert_bias_off, ValueError,
         lit("the weights carry an expert_bias but config.router.expert_bias is off; turn it on to use it")),
    # moeflux.integrations.transformers (calls in tests/integrations/error_cases.py)
    Case("hf-no-moe-block", hf.no_moe_block, ValueError,
         lit("Sequential has no sparse-MoE block moeflux can run (looked for: deepseek_v3, mixtral, olmoe, "
             "qwen2_moe, qwen3_moe)")),
    Case("hf-model-not-module", hf.model_not_module, TypeError, lit("model must be a torch.nn.Module, got str")),
    Case("hf-unknown-backend", hf.unknown_backend, ValueError,
         lit("unknown backend 'cuda'; expected one of ('auto', 'torch', 'triton')")),
    Case("hf-experts-layout", hf.experts_with_bias, ValueError,
         lit("model.layers.0.mlp.experts (Qwen3MoeExperts) has has_bias=True; moeflux runs experts stored as "
             "gate_up_proj [E, 2D, H] (gate rows, then up rows) and down_proj [E, H, D], without biases")),
    Case("hf-experts-activation", hf.experts_not_silu, ValueError,
         lit("model.layers.0.mlp.experts (Qwen3MoeExperts) uses the activation GELUActivation; moeflux runs "
             "SwiGLU experts (hidden_act='silu')")),
    Case("hf-router-rule", hf.groups_too_few_experts, ValueError,
         lit("model.layers.0.mlp.gate (DeepseekV3TopkRouter): top_k=4 exceeds the 2 experts of the "
             "topk_groups=1 groups kept per token (num_experts=8, num_groups=4)")),
    Case("hf-transformers-missing", hf.transformers_missing, ImportError,
         lit("moeflux's qwen3_moe patch needs transformers >= 5 (")),
    # moeflux.backends.resolve_backend
    Case("backend-unknown", lambda: resolve_backend("cuda", torch.device("cpu")), ValueError,
         lit("unknown backend 'cuda'; expected one of ('auto', 'torch', 'triton')")),
    Case("backend-triton-on-cpu", triton_on_cpu(lambda: resolve_backend("triton", torch.device("cpu"))),
         RuntimeError, lit("backend='triton' needs CUDA tensors (got cpu); set TRITON_INTERPRET=1 to run the "
                           "kernels on the CPU through Triton's interpreter")),
    Case("backend-triton-missing",
         without_triton(lambda: resolve_backend("triton", torch.device("cpu"))), RuntimeError,
         lit("backend='triton' needs the triton package")),
    # the CLI
    Case("cli-unknown-preset", lambda: cli.main(["check", "--preset", "nope"]), SystemExit,
         lit("unknown preset 'nope'; valid presets:\n")),
    Case("cli-custom-shape-incomplete", lambda: cli.main(["bench", "--hidden", "16"]), SystemExit,
         lit("a custom shape needs --hidden, --expert-dim, --experts and --top-k; missing --expert-dim, "
             "--experts, --top-k")),
    Case("cli-tokens-not-int",
         lambda: cli.main(["bench", "--hidden", "16", "--expert-dim", "8", "--experts", "4", "--top-k", "2",
                           "--tokens", "8,x"]),
         SystemExit, lit("--tokens takes comma-separated integers, got '8,x'")),
]
# fmt: on


def _nonfinite_tokens(backend: str) -> None:
    """``moeflux.moe`` docstring: NaN or Inf in a token propagates to that token's output and
    router probabilities; its expert ids stay in range. Other tokens are unaffected."""
    tokens = x(5, H)
    tokens[1, 3] = float("nan")
    tokens[3, 0] = float("inf")
    device = DEVICE if backend == "triton" else "cpu"
    out, aux = moeflux.moe(tokens.to(device), weights(device), K, backend=backend)
    bad = torch.tensor([False, True, False, True, False], device=device)
    assert not torch.isfinite(out[bad]).any()
    assert torch.isfinite(out[~bad]).all()
    assert torch.isnan(aux.router_probs[bad]).all() and torch.isfinite(aux.router_probs[~bad]).all()
    assert aux.expert_ids.min() >= 0 and aux.expert_ids.max() < E
    assert int(aux.tokens_per_expert.sum()) == 5 * K


def _zero_tokens() -> None:
    """README: ``T = 0`` gives an empty output (and empty aux tensors), no error."""
    for backend, device in (("torch", "cpu"), ("triton", DEVICE)):
        out, aux = moeflux.moe(x(0, H, device=device), weights(device), K, backend=backend)
        assert out.shape == (0, H) and aux.expert_ids.shape == (0, K)


def _layer_never_checks_ids() -> None:
    """The layer's expert ids come from its router, always in range: its forward (and backward)
    skip the host-syncing id check, so they stay CUDA-graph capturable."""

    def refuse(*args, **kwargs):
        raise AssertionError("the layer ran the host-syncing expert-id check")

    layer = moeflux.MoE(CONFIG, backend="triton", device=DEVICE)
    with mock.patch("moeflux.ops.dispatch.check_expert_ids", refuse):
        with torch.no_grad():
            layer(x(device=DEVICE))  # experts_triton_tables
        out, _ = layer(x(device=DEVICE))  # experts_autograd, forward and backward
        out.sum().backward()


def _check_ids_off() -> None:
    """``check_ids=False`` skips the check and its host sync: the kernels then trust the ids. Shown here with ids in range (out-of-range ids would read and
    write out of bounds)."""

    def refuse(*args, **kwargs):
        raise AssertionError("check_ids=False ran the check")

    w, tokens = weights(DEVICE), x(device=DEVICE)
    expert_ids, expert_weights = ids().to(DEVICE), routing_weights().to(DEVICE)
    with mock.patch("moeflux.ops.dispatch.check_expert_ids", refuse):
        build_dispatch_plan(expert_ids, E, check_ids=False)
        experts_triton(tokens, expert_ids, expert_weights, w.gate_up, w.down, E, check_ids=False)
        experts_autograd(tokens, expert_ids, expert_weights, w.gate_up, w.down, E, check_ids=False)
        moe_matmul_ogs_top1(tokens, stacked().to(DEVICE), expert_ids[:, 0], check_ids=False)
        run_experts(tokens, expert_ids, expert_weights, w, backend="triton")  # check_ids=False by default


def _zero_tokens_in_every_primitive() -> None:
    """``T = 0`` is supported everywhere (no launch does any work): empty outputs, and weight
    gradients of exact zeros (the shared experts included)."""
    from moeflux.ops.grouped_matmul.weight_grad import grouped_weight_grad

    w = weights(DEVICE)
    tokens, expert_ids, expert_weights = x(0, H, device=DEVICE), ids()[:0].to(DEVICE), routing_weights(0, K).to(DEVICE)
    empty_plan = build_dispatch_plan(expert_ids, E, num_shared_experts=S)
    assert empty_plan.num_pairs == 0 and int(empty_plan.num_tiles) == 0
    assert grouped_matmul(tokens, w.gate_up, empty_plan, gather=True, swiglu=True).shape == (0, D)
    assert torch.equal(grouped_weight_grad(tokens, tokens, empty_plan, a_rows="tokens", b_rows="tokens"),
                       torch.zeros(E + S, H, H, device=DEVICE))  # fmt: skip
    for backend in ("torch", "triton"):
        assert route(torch.zeros(0, E, device=DEVICE), K, backend=backend).expert_ids.shape == (0, K)
        assert run_experts(tokens, expert_ids, expert_weights, w, backend=backend).shape == (0, H)
    assert experts_triton(tokens, expert_ids, expert_weights, w.gate_up, w.down, E).shape == (0, H)
    leaves = [t.clone().requires_grad_() for t in (tokens, expert_weights, w.gate_up, w.down)]
    experts_autograd(leaves[0], expert_ids, *leaves[1:], E).sum().backward()
    assert leaves[0].grad.shape == (0, H) and all(bool((leaf.grad == 0).all()) for leaf in leaves[2:])
    for backend in ("torch", "triton"):
        leaves = [torch.randn(*shape, device=DEVICE).requires_grad_() for shape in ((0, H), (10, H), (10, H))]
        out = moeflux.flash_expert(*leaves, torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
                                   torch.zeros(0, 2, device=DEVICE), backend=backend)  # fmt: skip
        out.sum().backward()
        assert out.shape == (0, H) and all(bool((leaf.grad == 0).all()) for leaf in leaves[1:])


def _flash_atomics_under_deterministic_algorithms() -> None:
    """``deterministic=False`` (float32 atomics) gives way to the sorted reduction under
    ``torch.use_deterministic_algorithms(True)``, with a warning (tests/test_determinism.py)."""
    before = torch.are_deterministic_algorithms_enabled()
    leaf = torch.randn(T, H, device=DEVICE, requires_grad=True)
    args = dict(down_weights=torch.randn(10, H, device=DEVICE, requires_grad=True),
                up_weights=torch.randn(10, H, device=DEVICE), indices=torch.tensor([[0, 9], [3, 3], [5, 1]], device=DEVICE),
                routing_weights=torch.rand(T, 2, device=DEVICE), backend="triton")  # fmt: skip
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.warns(UserWarning, match=lit("using the deterministic sorted reduction instead")):
            moeflux.flash_expert(leaf, deterministic=False, **args).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)


def _layer_under_deterministic_algorithms() -> None:
    """Both backends run forward and backward under ``torch.use_deterministic_algorithms(True)``
    (no op raises, no warning from moeflux), with the same results (tests/test_determinism.py
    checks the bits)."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for backend in ("torch", "triton"):
            layer = moeflux.MoE(CONFIG, backend=backend, device=DEVICE)
            out, aux = layer(x(device=DEVICE))
            (out.sum() + aux.load_balancing_loss).backward()
            assert torch.isfinite(out).all() and torch.isfinite(layer.gate_up.grad).all()
    finally:
        torch.use_deterministic_algorithms(before)


BEHAVIOURS = {
    "moe-nonfinite-token": lambda: _nonfinite_tokens("torch"),
    "moe-nonfinite-token-triton": lambda: _nonfinite_tokens("triton"),
    "moe-zero-tokens": _zero_tokens,
    "moe-no-id-check": _layer_never_checks_ids,
    "check-ids-off": _check_ids_off,
    "zero-tokens-primitives": _zero_tokens_in_every_primitive,
    "flash-deterministic-algorithms": _flash_atomics_under_deterministic_algorithms,
    "layer-deterministic-algorithms": _layer_under_deterministic_algorithms,
}


@pytest.mark.parametrize("case", ERRORS, ids=[case.id for case in ERRORS])
def test_error(case: Case) -> None:
    with pytest.raises(case.error, match=case.match):
        case.call()


@pytest.mark.parametrize("case_id", list(BEHAVIOURS))
def test_behaviour(case_id: str) -> None:
    BEHAVIOURS[case_id]()


def _doc_rows() -> list[list[str]]:
    """The table rows of docs/errors.md whose first cell is a backticked case id, as cells."""
    rows = []
    for line in DOC.read_text().splitlines():
        if re.match(r"^\|\s*`[a-z0-9-]+`\s*\|", line):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_case_ids_are_unique() -> None:
    all_ids = [case.id for case in ERRORS] + list(BEHAVIOURS)
    assert len(all_ids) == len(set(all_ids)), sorted(i for i in all_ids if all_ids.count(i) > 1)


def test_doc_lists_every_case() -> None:
    """docs/errors.md has one row per case, keyed by its id, and the same exception type."""
    rows = _doc_rows()
    documented = [row[0].strip("`") for row in rows]
    assert len(documented) == len(set(documented)), "a case id appears twice in docs/errors.md"
    expected = {case.id for case in ERRORS} | set(BEHAVIOURS)
    assert sorted(set(documented) - expected) == [], "documented in docs/errors.md but not tested here"
    assert sorted(expected - set(documented)) == [], "tested here but missing from docs/errors.md"
    errors = {case.id: case.error.__name__ for case in ERRORS}
    for row in rows:
        case_id = row[0].strip("`")
        if case_id in errors:
            assert row[3].strip("`") == errors[case_id], f"{case_id}: the doc says {row[3]}"
