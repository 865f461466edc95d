"""Every adapter computes the same layer: outputs (and, in training, gradients) match."""

import sys
import types

import pytest
import torch

from moeflux.bench.cases import FlashExpertCase, MoECase
from moeflux.bench.shapes import FlashExpertShape, Shape
from moeflux.bench.systems import SYSTEMS, System, default_systems, make_system

# E=8 with 1 shared expert, k=2, T=24: every expert gets tokens, the shared path runs.
SHAPE = Shape("tiny", dhidden=32, dexpert=16, nroutedexperts=8, nsharedexperts=1, nexpertspertoken=2, bs=2,
              seqlen=12, seed=3)  # fmt: skip
MOE_SYSTEMS = ["moeflux-torch", "torch-grouped-mm", "eager-loop", "seed-reference"]


@pytest.fixture(scope="module")
def case():
    return MoECase.build(SHAPE, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", MOE_SYSTEMS)
def test_moe_systems_match_the_seed_reference(case, name):
    system = make_system(name)
    assert system.available(torch.device("cpu")), system.note
    system.prepare(case)
    with torch.no_grad():
        out = system().reshape(-1, SHAPE.dhidden)
    torch.testing.assert_close(out, case.reference(), rtol=1e-5, atol=1e-5)
    system.release()


def test_shared_expert_changes_the_output(case):
    # Guards the comparison above: without its shared expert a system would differ.
    system = make_system("torch-grouped-mm")
    system.prepare(case)
    system.shared = []
    with torch.no_grad():
        assert not torch.allclose(system().reshape(-1, SHAPE.dhidden), case.reference(), atol=1e-3)


@pytest.mark.parametrize("name", ["torch-grouped-mm", "eager-loop"])
def test_training_gradients_match_moeflux(case, name):
    torch_path, other = make_system("moeflux-torch"), make_system(name)
    grads = {}
    for system in (torch_path, other):
        system.prepare(case)
        leaves = system.leaves()
        for leaf in leaves:
            leaf.requires_grad_(True)
        out = system()
        grad_out = torch.ones_like(out)
        grads[system.name] = dict(zip(["x", "router"], torch.autograd.grad(out, leaves[:2], grad_out)))
        for leaf in leaves:
            leaf.requires_grad_(False)
    torch.testing.assert_close(grads[name]["x"], grads["moeflux-torch"]["x"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[name]["router"], grads["moeflux-torch"]["router"], rtol=1e-4, atol=1e-5)


def test_transformers_peer_matches_the_seed_reference(case):
    pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    system = make_system("hf-qwen3-moe")
    system.prepare(case)
    assert system.note.startswith("experts_implementation=")
    with torch.no_grad():
        out = system().reshape(-1, SHAPE.dhidden)
    torch.testing.assert_close(out, case.reference(), rtol=1e-4, atol=1e-4)


def test_transformers_peer_is_skipped_with_a_note_when_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    monkeypatch.delitem(sys.modules, "transformers.models.qwen3_moe.modeling_qwen3_moe", raising=False)
    system = make_system("hf-qwen3-moe")
    assert not system.available(torch.device("cpu"))
    assert "pip install transformers" in system.note


def test_flash_expert_systems_agree():
    shape = FlashExpertShape("f", tokens=16, hidden=32, num_experts=256, top_k=4, seed=1)
    case = FlashExpertCase.build(shape, torch.device("cpu"), torch.float32)
    system = make_system("flash-expert-torch")
    assert system.available(torch.device("cpu")), system.note
    system.prepare(case)
    with torch.no_grad():
        torch.testing.assert_close(system(), case.reference())
    assert int(case.expert_load().sum()) == 16 * 4


def test_default_systems_leave_interpreted_triton_off_the_cpu():
    cpu = default_systems("moe", torch.device("cpu"))
    assert cpu == ["moeflux-torch", "torch-grouped-mm", "eager-loop", "hf-qwen3-moe", "seed-reference"]
    assert default_systems("flash-expert", torch.device("cpu")) == ["flash-expert-torch"]
    on_cpu = set(cpu) | set(default_systems("flash-expert", torch.device("cpu")))
    assert on_cpu == set(SYSTEMS) - {"moeflux-triton", "flash-expert-triton"}


class DoubleTorch(System):
    """A user adapter: twice moeflux's torch path (wrong on purpose, to show it is the one called)."""

    name = "double-torch"
    description = "2 x moeflux-torch"

    def __call__(self):
        from moeflux.layer import moe

        return 2 * moe(self.case.x, self.case.weights, self.case.config.top_k, backend="torch")[0]


def test_a_user_adapter_loads_from_module_and_class(monkeypatch, case):
    module = types.ModuleType("my_adapters")
    module.DoubleTorch = DoubleTorch
    monkeypatch.setitem(sys.modules, "my_adapters", module)
    system = make_system("my_adapters:DoubleTorch")
    assert system.name == "double-torch"
    system.prepare(case)
    with torch.no_grad():
        torch.testing.assert_close(system().reshape(-1, SHAPE.dhidden), 2 * case.reference(), rtol=1e-5, atol=1e-5)


def test_unknown_system_names_the_valid_ones():
    with pytest.raises(SystemExit, match="torch-grouped-mm"):
        make_system("no-such-system")
