"""Shapes, presets and the FLOP / byte counters behind every TFLOP/s and GB/s figure."""

import json

import pytest

from moeflux.bench.shapes import (
    PRESETS, FlashExpertShape, Shape, custom_shapes, layers, shapes_from_file, unknown_preset_message,
)  # fmt: skip

# H=4, D=3, E=5 routed, S=1 shared, k=2, T=7: small enough to count by hand.
TINY = Shape("tiny", dhidden=4, dexpert=3, nroutedexperts=5, nsharedexperts=1, nexpertspertoken=2, bs=1, seqlen=7,
             seed=0)  # fmt: skip


def test_moe_flops_by_hand():
    # router 2*T*H*E = 2*7*4*5 = 280; experts 2*T*H*3D*(k+S) = 2*7*4*9*3 = 1512.
    assert TINY.flops() == 280 + 1512
    assert TINY.flops("train") == 3 * (280 + 1512)


def test_moe_flops_of_a_competition_shape():
    shape = Shape("b0", 7168, 2048, 32, 1, 4, 1, 2048, 0)
    # 2*2048*7168*32 (router) + 2*2048*7168*3*2048*5 (4 routed + 1 shared SwiGLU, 3 GEMMs each).
    assert shape.flops() == 902_882_656_256


def test_moe_bytes_by_hand():
    # Weights used: router E*H = 20, plus 3*H*D = 36 per active routed expert and per shared slice.
    # 4 active: 20 + 36*5 = 200 elements; input + output 2*T*H = 56; fp16 = 2 bytes each.
    assert TINY.bytes_moved(2, active_experts=4) == 2 * (200 + 56)
    # Without routing: min(E, T*k) = 5 active -> 20 + 36*6 = 236.
    assert TINY.bytes_moved(2) == 2 * (236 + 56)
    # Train: weights read twice and their gradients written (3x), five T*H activations.
    assert TINY.bytes_moved(2, active_experts=4, mode="train") == 2 * (3 * 200 + 5 * 28)
    # A decode step of 1 token with k=2 can touch at most 2 experts.
    one_token = TINY.with_tokens(1)
    assert one_token.bytes_moved(4) == 4 * (20 + 36 * 3 + 2 * 4)


def test_flash_expert_flops_and_bytes_by_hand():
    shape = FlashExpertShape("f", tokens=8, hidden=4, num_experts=100, top_k=3)
    assert shape.flops() == 4 * 8 * 3 * 4  # a dot and a scaled add of width H per (token, slot)
    # K rows of both pools per token (2*8*3*4 = 192) + input and output (2*8*4 = 64), bf16.
    assert shape.bytes_moved(2) == 2 * (192 + 64)
    assert shape.bytes_moved(2, mode="train") == 2 * 2 * (192 + 64)


def test_every_preset_builds_shapes_of_one_workload():
    for preset in PRESETS.values():
        shapes = preset.shapes()
        assert shapes, preset.name
        assert {shape.workload for shape in shapes} == {preset.workload}, preset.name
        assert len({shape.name for shape in shapes}) == len(shapes), f"{preset.name}: duplicate shape names"


def test_competition_preset_is_the_six_shapes():
    shapes = PRESETS["competition"].shapes()
    assert [shape.tokens for shape in shapes] == [512, 1024, 8192, 2048, 8192, 8192]
    assert {(s.dhidden, s.dexpert, s.nsharedexperts, s.nexpertspertoken) for s in shapes} == {(7168, 2048, 1, 4)}


def test_sweeps_run_the_chosen_layer_at_powers_of_two():
    sweep = PRESETS["token-sweep"].shapes("qwen3-30b-a3b")
    assert [shape.tokens for shape in sweep] == [2**i for i in range(15)]
    assert {shape.layer for shape in sweep} == {layers()["qwen3-30b-a3b"].layer}
    assert [shape.tokens for shape in PRESETS["decode"].shapes()] == [1, 2, 4, 8, 16, 32, 64, 128]
    with pytest.raises(SystemExit, match="unknown layer"):
        PRESETS["decode"].shapes("no-such-model")


def test_model_presets_use_the_model_layer():
    qwen = PRESETS["qwen3-30b-a3b"].shapes()
    assert {(s.dhidden, s.dexpert, s.nroutedexperts, s.nsharedexperts, s.nexpertspertoken) for s in qwen} == {
        (2048, 768, 128, 0, 8)
    }
    assert 32 in [s.tokens for s in qwen] and 4096 in [s.tokens for s in qwen]


def test_unknown_preset_message_lists_every_preset():
    message = unknown_preset_message("nope")
    assert "'nope'" in message
    assert all(name in message for name in PRESETS)


def test_custom_shapes_from_flags():
    shapes = custom_shapes(hidden=64, expert_dim=32, experts=8, top_k=2, shared=1, tokens=[16, 64])
    numbers = [(s.tokens, s.dhidden, s.dexpert, s.nroutedexperts, s.nsharedexperts, s.nexpertspertoken) for s in shapes]
    assert numbers == [(16, 64, 32, 8, 1, 2), (64, 64, 32, 8, 1, 2)]


def test_shapes_from_json_and_yaml_files(tmp_path):
    entries = [
        {"hidden": 64, "expert_dim": 32, "experts": 8, "top_k": 2, "tokens": 16},
        {"name": "seed-style", "dhidden": 32, "dexpert": 16, "nroutedexperts": 4, "nsharedexperts": 1,
         "nexpertspertoken": 1, "bs": 2, "seqlen": 3, "seed": 5},
    ]  # fmt: skip
    (tmp_path / "shapes.json").write_text(json.dumps({"shapes": entries}))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "shapes.yaml").write_text(yaml.safe_dump(entries))
    for name in ("shapes.json", "shapes.yaml"):
        first, second = shapes_from_file(tmp_path / name)
        assert (first.dhidden, first.tokens, first.nsharedexperts) == (64, 16, 0)
        assert (second.name, second.tokens, second.seed) == ("seed-style", 6, 5)
    (tmp_path / "flash.json").write_text(json.dumps([{"workload": "flash-expert", "tokens": 4, "hidden": 8,
                                                      "num_experts": 16, "top_k": 2}]))  # fmt: skip
    (flash,) = shapes_from_file(tmp_path / "flash.json")
    assert flash.workload == "flash-expert" and flash.num_experts == 16
