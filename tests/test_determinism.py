"""Determinism: which paths use atomics, and ``torch.use_deterministic_algorithms(True)``.

The default paths sum in a fixed order (no float atomics), so two runs are bitwise equal; the
GPU check (``benchmarks/reliability_gpu.py``) runs them twice on the device, forward and
backward. Here, on the CPU:

* every Triton atomic in ``src/moeflux`` is one of the known, accounted-for ones (a new one
  must be added to ``TRITON_ATOMICS`` with the reason it is deterministic or opt-in and
  honours the setting);
* the one opt-in float-atomic path (``flash_expert(..., deterministic=False)``) gives way to
  the sorted reduction under ``torch.use_deterministic_algorithms(True)``, with a warning,
  and computes bitwise what the deterministic path computes;
* the layer (both backends) and the flash expert run forward and backward under the setting
  (PyTorch raises for a non-deterministic op it has no alternative for), with the same bits
  as without it; and two runs give the same bits.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import moeflux
from moeflux.ops.flash_expert import flash_expert
from moeflux.ops.flash_expert import triton as flash_kernels

SRC = Path(__file__).resolve().parents[1] / "src" / "moeflux"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton atomics per file, with why each is acceptable. (PyTorch's own accumulating ops,
# index_add_ / scatter_add_ / scatter_reduce_, switch to deterministic versions under
# torch.use_deterministic_algorithms(True) or raise; test_layer_under_deterministic_algorithms runs them.)
TRITON_ATOMICS = {
    # int32 histogram of the chosen experts: integer addition gives the same sum in any order.
    "ops/routing/triton.py": 1,
    # Flash-expert weight gradients with deterministic=False (opt-in); refused under
    # torch.use_deterministic_algorithms(True) (test_flash_expert_atomics_give_way...).
    "ops/flash_expert/triton.py": 2,
}


def test_every_triton_atomic_is_accounted_for():
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        if "bench" in path.relative_to(SRC).parts:  # the benchmark's peer systems are not moeflux's paths
            continue
        count = len(re.findall(r"\btl\.atomic_\w+\(", path.read_text()))
        if count:
            found[str(path.relative_to(SRC))] = count
    unaccounted = {name: n for name, n in found.items() if n > TRITON_ATOMICS.get(name, 0)}
    assert not unaccounted, (
        f"Triton atomics not accounted for in TRITON_ATOMICS: {unaccounted}. A float atomic makes results "
        "vary from run to run: add it to the list with the reason it is deterministic, or make its path "
        "opt-in and give way under torch.use_deterministic_algorithms(True)."
    )


@pytest.fixture
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` for the test, restored afterwards."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def flash_inputs(T=24, H=40, E=30, K=5, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(T, H, generator=generator), torch.randn(E, H, generator=generator) / H**0.5,
               torch.randn(E, H, generator=generator)]  # fmt: skip
    indices = torch.randint(0, E, (T, K), generator=generator)
    routing_weights = torch.rand(T, K, generator=generator)
    grad_out = torch.randn(T, H, generator=generator)
    return [t.to(DEVICE, dtype) for t in tensors], indices.to(DEVICE), routing_weights.to(DEVICE), grad_out.to(DEVICE)


def flash_run(deterministic: bool):
    """``(out, d_hidden, d_down, d_up, d_routing_weights)`` of the Triton flash expert."""
    tensors, indices, routing_weights, grad_out = flash_inputs()
    leaves = [t.requires_grad_() for t in (*tensors, routing_weights)]
    out = flash_expert(*leaves[:3], indices, leaves[3], backend="triton", deterministic=deterministic)
    out.backward(grad_out)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def refuse(*args, **kwargs):
    raise AssertionError("the float-atomic weight-gradient kernel ran")


def test_flash_expert_atomics_give_way_under_deterministic_algorithms(deterministic_algorithms):
    reference = flash_run(deterministic=True)
    with mock.patch.object(flash_kernels, "launch_atomic_expert_grads", refuse):
        with pytest.warns(UserWarning, match=r"flash_expert: deterministic=False asks for float32 atomic weight "
                          r"gradients, but torch.use_deterministic_algorithms\(True\) is set; using the "
                          r"deterministic sorted reduction instead"):  # fmt: skip
            results = flash_run(deterministic=False)
    for actual, expected in zip(results, reference):
        assert torch.equal(actual, expected)


def test_flash_expert_atomics_run_when_asked_for():
    """Without the setting, ``deterministic=False`` takes the atomic path, silently."""
    calls = []
    original = flash_kernels.launch_atomic_expert_grads

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with mock.patch.object(flash_kernels, "launch_atomic_expert_grads", spy), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*determinis")
        results = flash_run(deterministic=False)
    assert calls == [1]
    for actual, expected in zip(results, flash_run(deterministic=True)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def layer_run(backend: str):
    """``(out, dx, d_router, d_gate_up, d_down)`` of one layer forward and backward."""
    config = moeflux.MoEConfig(hidden_size=32, expert_size=16, num_experts=6, top_k=3, num_shared_experts=1)
    layer = moeflux.MoE(config, backend=backend, device=DEVICE)
    with torch.no_grad():
        for parameter, generator in zip(layer.parameters(), range(3)):
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(generator)) * 0.2)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE).requires_grad_()
    out, aux = layer(x)
    (out.square().sum() + aux.load_balancing_loss + aux.router_z_loss).backward()
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_runs_are_bitwise_equal(backend):
    for first, second in zip(layer_run(backend), layer_run(backend)):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_under_deterministic_algorithms(backend, deterministic_algorithms):
    """No op on either path raises under the setting (on the CPU; the GPU script runs the CUDA
    versions), and the results keep their bits: the default paths are deterministic already."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*determinis")  # no "falls back" warning on the default paths
        results = layer_run(backend)
    torch.use_deterministic_algorithms(False)
    for actual, expected in zip(results, layer_run(backend)):
        assert torch.equal(actual, expected)
