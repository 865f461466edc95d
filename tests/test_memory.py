"""Device memory (``moeflux.memory``): the workspace estimates bound what the Triton paths
allocate, a request that cannot fit raises ``torch.OutOfMemoryError`` naming the bytes before
anything launches, and docs/memory.md shows the numbers the estimates give.

What a call allocates is measured on the CPU by a dispatch mode that follows every storage
the call's ops create until it is freed (:class:`AllocationTracker`). The free-memory query
is CUDA-only; the tests patch :func:`moeflux.memory.available_bytes`.
"""

from __future__ import annotations

import gc
import math
import re
import weakref
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeflux import memory
import moeflux.ops.experts.autograd as experts_autograd_module
from moeflux.ops.experts.autograd import experts_autograd
from moeflux.ops.experts.triton import experts_triton
from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.flash_expert import triton as flash_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DOC = Path(__file__).resolve().parents[1] / "docs" / "memory.md"


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the tensor storages the ops under it create: a storage counts from the op
    that makes it until it is freed (a finalizer on the storage), so ``peak`` is the most
    memory the traced code held at once, whatever allocates it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    paused = False  # while Triton's interpreter runs a kernel on its own host copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if AllocationTracker.paused or func.is_view or func is torch.ops.aten.set_.source_Storage_storage_offset:
            return out  # views share their base's storage
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.seen:
                    self.seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)


def measured_peak(fn) -> tuple[int, object]:
    """``(peak bytes allocated at once while fn runs, fn())``, not counting the copies Triton's
    interpreter makes of a kernel's arguments while it runs (on a GPU there are none)."""
    from triton.runtime.interpreter import GridExecutor

    launch = GridExecutor.__call__

    def untracked_launch(*args, **kwargs):
        AllocationTracker.paused = True
        try:
            return launch(*args, **kwargs)
        finally:
            gc.collect()  # the interpreter's host copies sit in reference cycles: free them now
            AllocationTracker.paused = False

    gc.collect()
    with mock.patch.object(GridExecutor, "__call__", untracked_launch), AllocationTracker() as tracker:
        result = fn()
    return tracker.peak, result


def experts_inputs(T, H, D, E, k, S, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=generator).to(dtype)
    expert_ids = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)]) if T else torch.zeros(
        0, k, dtype=torch.int64
    )
    expert_weights = torch.rand(T, k, generator=generator)
    gate_up = (torch.randn(E + S, H, 2 * D, generator=generator) / math.sqrt(H)).to(dtype)
    down = (torch.randn(E + S, D, H, generator=generator) / math.sqrt(D)).to(dtype)
    return x, expert_ids, expert_weights, gate_up, down


# (T, H, D, E, k, S, dtype): what it exercises
EXPERT_SHAPES = [
    pytest.param(0, 16, 8, 4, 2, 1, torch.float32, id="T0"),
    pytest.param(1, 16, 8, 4, 2, 0, torch.float32, id="T1"),
    pytest.param(37, 48, 24, 6, 2, 1, torch.float32, id="ragged-shared"),
    pytest.param(64, 40, 16, 33, 4, 2, torch.bfloat16, id="E33-bf16-two-shared"),
    pytest.param(50, 32, 64, 3, 3, 0, torch.float16, id="k-equals-E-wide-D"),
]
# Estimates may overshoot by this factor (plus small fixed allocations): bounds, not guesses.
# They may miss a few scalars (select_config's dtype probes): SCALARS bytes.
SLACK, FIXED, SCALARS = 1.6, 16 * 1024, 64


@pytest.mark.parametrize("T, H, D, E, k, S, dtype", EXPERT_SHAPES)
def test_experts_estimates_bound_what_is_allocated(T, H, D, E, k, S, dtype):
    x, expert_ids, expert_weights, gate_up, down = experts_inputs(T, H, D, E, k, S, dtype)
    args = (x, expert_ids, expert_weights, gate_up, down, E)
    experts_triton(*args)  # compile outside the measurement

    peak, _ = measured_peak(lambda: experts_triton(*args))
    estimate = memory.experts_forward_bytes(T, H, D, k, E, S, dtype)
    assert peak <= estimate.peak + SCALARS and estimate.peak <= SLACK * peak + FIXED, ("inference forward", peak, estimate)

    leaves = [t.clone().requires_grad_() for t in (x, expert_weights, gate_up, down)]
    train_peak, out = measured_peak(lambda: experts_autograd(leaves[0], expert_ids, *leaves[1:], E))
    estimate = memory.experts_forward_bytes(T, H, D, k, E, S, dtype, training=True)
    assert train_peak <= estimate.peak + SCALARS and estimate.peak <= SLACK * train_peak + FIXED, ("training forward", train_peak, estimate)

    grad_out = torch.randn_like(out)
    backward_peak, _ = measured_peak(lambda: out.backward(grad_out))
    estimate = memory.experts_backward_bytes(T, H, D, k, E, S, dtype)
    assert backward_peak <= estimate.peak + SCALARS and estimate.peak <= SLACK * backward_peak + FIXED, ("backward", backward_peak, estimate)


@pytest.mark.parametrize("band", [1024, 16], ids=["one-band", "bands-of-16"])
@pytest.mark.parametrize("T, H, D, E, k, S, dtype", EXPERT_SHAPES)
def test_recompute_estimates_bound_what_is_allocated(T, H, D, E, k, S, dtype, band, monkeypatch):
    # The recomputing backward: nothing saved beyond the plan and weights; its workspace is
    # per band of D (bands of 16 split D = 24 and 64 into several).
    monkeypatch.setattr(experts_autograd_module, "RECOMPUTE_MIN_BAND", band)
    x, expert_ids, expert_weights, gate_up, down = experts_inputs(T, H, D, E, k, S, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, expert_weights, gate_up, down)]

    def forward():
        return experts_autograd(leaves[0], expert_ids, *leaves[1:], E, recompute=True)

    forward().sum().backward()  # compile outside the measurement
    for leaf in leaves:
        leaf.grad = None
    train_peak, out = measured_peak(forward)
    estimate = memory.experts_forward_bytes(T, H, D, k, E, S, dtype)
    assert train_peak <= estimate.peak + SCALARS and estimate.peak <= SLACK * train_peak + FIXED, ("forward", train_peak, estimate)
    grad_out = torch.randn_like(out)
    backward_peak, _ = measured_peak(lambda: out.backward(grad_out))
    estimate = memory.experts_backward_bytes(T, H, D, k, E, S, dtype, recompute=True)
    assert backward_peak <= estimate.peak + SCALARS and estimate.peak <= SLACK * backward_peak + FIXED, ("backward", backward_peak, estimate)


# (T, H, E, K, dtype, deterministic, sorted_dots)
FLASH_SHAPES = [
    pytest.param(0, 16, 6, 3, torch.float32, True, False, id="T0"),
    pytest.param(40, 33, 100, 4, torch.float32, True, False, id="sorted-weight-grads"),
    pytest.param(40, 64, 50, 7, torch.bfloat16, False, False, id="atomic-weight-grads"),
    pytest.param(24, 48, 10, 8, torch.float16, True, True, id="sorted-dots"),
]


@pytest.mark.parametrize("T, H, E, K, dtype, deterministic, sorted_dots", FLASH_SHAPES)
def test_flash_expert_estimates_bound_what_is_allocated(T, H, E, K, dtype, deterministic, sorted_dots):
    generator = torch.Generator().manual_seed(T)
    leaves = [torch.randn(*shape, generator=generator).to(dtype).requires_grad_() for shape in ((T, H), (E, H), (E, H))]
    routing_weights = torch.randn(T, K, generator=generator).requires_grad_()
    indices = torch.randint(0, E, (T, K), generator=generator)
    config = flash_kernels.default_config(H, K, dtype).replace(sorted_dots=sorted_dots)

    def forward():
        return flash_expert(*leaves, indices, routing_weights, backend="triton", deterministic=deterministic,
                            config=config)  # fmt: skip

    forward().sum().backward()  # compile outside the measurement
    for leaf in (*leaves, routing_weights):
        leaf.grad = None  # the measured backward allocates its gradients afresh
    peak, out = measured_peak(forward)
    estimate = memory.flash_expert_forward_bytes(T, H, E, K, dtype, sorted_dots=sorted_dots)
    assert peak <= estimate.peak + SCALARS and estimate.peak <= SLACK * peak + FIXED, ("forward", peak, estimate)
    grad_out = torch.randn_like(out)
    backward_peak, _ = measured_peak(lambda: out.backward(grad_out))
    estimate = memory.flash_expert_backward_bytes(T, H, E, K, dtype, deterministic=deterministic)
    assert backward_peak <= estimate.peak + SCALARS and estimate.peak <= SLACK * backward_peak + FIXED, ("backward", backward_peak, estimate)


class Launched(AssertionError):
    pass


def refuse_launch(*args, **kwargs):
    raise Launched("a kernel launched before the memory check")


@pytest.fixture
def little_free_memory(monkeypatch):
    """1 MiB free on every device, and every request checked (no 64 MiB floor)."""
    queried = []

    def available(device, at_least=0):
        queried.append((device, at_least))
        return 2**20

    monkeypatch.setattr(memory, "available_bytes", available)
    monkeypatch.setattr(memory, "CHECK_MIN_BYTES", 0)
    return queried


OOM = r"needs ([\d,]+) bytes \([\d.]+ GiB\) of device memory for its workspace and outputs, but \S+ has 1,048,576 bytes"


def test_experts_forward_refuses_before_launching(little_free_memory):
    x, expert_ids, expert_weights, gate_up, down = experts_inputs(2048, 64, 32, 8, 2, 1, torch.float32)
    with mock.patch("moeflux.ops.experts.triton.build_dispatch_plan", refuse_launch):
        with pytest.raises(torch.OutOfMemoryError, match="the Triton experts forward " + OOM) as error:
            experts_triton(x, expert_ids, expert_weights, gate_up, down, 8)
    required = int(error.value.args[0].split("needs ")[1].split(" bytes")[0].replace(",", ""))
    assert required == memory.experts_forward_bytes(2048, 64, 32, 2, 8, 1, torch.float32).peak
    assert "bytes a token: split the batch into chunks that fit" in str(error.value)

    with mock.patch("moeflux.ops.experts.autograd.build_dispatch_plan", refuse_launch):
        with pytest.raises(torch.OutOfMemoryError, match=r"the Triton experts forward \(training\) " + OOM):
            experts_autograd(x.requires_grad_(), expert_ids, expert_weights, gate_up, down, 8)


def test_experts_backward_refuses_before_launching(monkeypatch):
    x, expert_ids, expert_weights, gate_up, down = experts_inputs(512, 64, 32, 8, 2, 1, torch.float32)
    out = experts_autograd(x.requires_grad_(), expert_ids, expert_weights, gate_up, down, 8)
    backward = memory.experts_backward_bytes(512, 64, 32, 2, 8, 1, torch.float32).peak
    monkeypatch.setattr(memory, "CHECK_MIN_BYTES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device, at_least=0: backward - 1)
    with mock.patch("moeflux.ops.experts.autograd.grouped_matmul", refuse_launch):
        with pytest.raises(torch.OutOfMemoryError, match=f"the Triton experts backward needs {backward:,} bytes"):
            out.sum().backward()


def test_flash_expert_refuses_before_launching(little_free_memory):
    hidden, down, up = torch.randn(4096, 64), torch.randn(1000, 64), torch.randn(1000, 64)
    indices, routing_weights = torch.randint(0, 1000, (4096, 8)), torch.rand(4096, 8)
    with mock.patch.object(flash_kernels, "launch_dots", refuse_launch):
        with pytest.raises(torch.OutOfMemoryError, match="the Triton flash_expert forward " + OOM):
            flash_expert(hidden, down, up, indices, routing_weights, backend="triton")
    # The backward is checked on its own (the pool gradients are [E, H] each).
    leaves = [t.requires_grad_() for t in (torch.randn(4, 64), torch.randn(10_000, 64), torch.randn(10_000, 64))]
    out = flash_expert(*leaves, indices[:4], routing_weights[:4], backend="triton")  # needs < 1 MiB
    with mock.patch.object(flash_kernels, "launch_expert_grads", refuse_launch):
        with pytest.raises(torch.OutOfMemoryError, match="the Triton flash_expert backward " + OOM):
            out.sum().backward()


def test_no_query_below_the_floor_nor_off_cuda(monkeypatch):
    """Small requests, and requests off CUDA, never query the device (nor raise)."""
    x, expert_ids, expert_weights, gate_up, down = experts_inputs(16, 16, 8, 4, 2, 0, torch.float32)

    def refuse(device, at_least=0):
        raise AssertionError("queried the free memory")

    with mock.patch.object(memory, "available_bytes", refuse):
        experts_triton(x, expert_ids, expert_weights, gate_up, down, 4)  # below CHECK_MIN_BYTES
    monkeypatch.setattr(memory, "CHECK_MIN_BYTES", 0)
    assert memory.available_bytes(torch.device("cpu")) is None
    memory.check_fits(10**15, torch.device("cpu"), "a CPU call")  # nothing to check on the CPU


def test_available_bytes_adds_the_allocators_unallocated_memory_only_when_needed():
    device = torch.device("cuda", 0)
    with mock.patch("torch.cuda.mem_get_info", return_value=(100, 1000)), \
            mock.patch("torch.cuda.memory_reserved", return_value=70), \
            mock.patch("torch.cuda.memory_allocated", return_value=30):  # fmt: skip
        assert memory.available_bytes(device, at_least=50) == 100
        assert memory.available_bytes(device, at_least=120) == 140


def _doc_table() -> dict[str, list[str]]:
    """docs/memory.md's per-token table: shape name -> its cells."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| (\S[^|]*?) \| (\d+) \| (.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split("|")]
    return rows


def test_doc_table_is_what_the_estimates_give():
    """docs/memory.md shows :func:`memory.per_token_table` (regenerate it with
    ``python3 -m moeflux.memory``)."""
    expected = memory.per_token_table() + memory.flash_per_token_table()
    assert _doc_table() == {row[0]: row for row in expected}
