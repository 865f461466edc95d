"""``moeflux bench``, ``report``, ``demo`` and ``check`` on tiny CPU shapes: every subcommand and
output format. No test asserts a timing."""

import importlib.util
import json
import struct
import sys

import pytest

from moeflux.bench.schema import validate
from moeflux.cli import main

# One custom layer at two token counts: E=8 with a shared expert, k=2.
TINY = ["--hidden", "64", "--expert-dim", "32", "--experts", "8", "--top-k", "2", "--shared", "1",
        "--tokens", "16,48", "--warmup", "1", "--repeat", "3"]  # fmt: skip
TINY_SYSTEMS = ["moeflux-torch", "torch-grouped-mm", "eager-loop", "seed-reference"]
# The Hugging Face peer runs where transformers is installed (not in CI) and is skipped elsewhere.
PEER = ["hf-qwen3-moe"] if importlib.util.find_spec("transformers") else []


def _markdown_table_rows(markdown: str) -> list[list[str]]:
    """Data rows of the first Markdown table (after its header and separator lines)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| shape |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """One bench run on the tiny layer, with serving and a cold start, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", *TINY, "--systems", ",".join(TINY_SYSTEMS + ["hf-qwen3-moe"]), "--serve",
            "--serve-requests", "6", "--cold-start", "moeflux-torch",
            "--json", str(out / "r.json"), "--markdown", str(out / "r.md")]  # fmt: skip
    assert main(argv) == 0
    return out


def test_check_passes_and_writes_results(tmp_path, capsys):
    assert main(["check", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "check-cpu-small.json").read_text())
    assert report["rows"] and all(row["passed"] for row in report["rows"])
    assert "| shape |" in capsys.readouterr().out


def test_bench_json_validates_and_holds_every_section(bench_json):
    document = json.loads((bench_json / "r.json").read_text())
    assert validate(document) == []
    timed = [row for row in document["rows"] if row["status"] == "ok"]
    assert {(row["shape"], row["system"]) for row in timed} == {
        (shape["name"], system) for shape in document["shapes"] for system in TINY_SYSTEMS + PEER
    }
    assert all(row["median_ms"] > 0 and row["rel_l2"] < 1e-5 for row in timed)
    peer = [row for row in document["rows"] if row["system"] == "hf-qwen3-moe"]
    assert all(row["status"] == ("ok" if PEER else "skipped") for row in peer) and len(peer) == 2
    assert [shape["tokens"] for shape in document["shapes"]] == [16, 48]
    assert all(sum(shape["tokens_per_expert"]) == shape["tokens"] * 2 for shape in document["shapes"])
    assert document["settings"]["baseline"] == "torch-grouped-mm"
    assert document["headline"]["system"] == "moeflux-torch"
    (cold,) = document["cold_start"]
    assert cold["note"] == "" and cold["first_call_cold_ms"] > 0 and cold["first_call_warm_ms"] > 0
    assert [entry["system"] for entry in document["serve"]] == TINY_SYSTEMS + PEER
    assert all(entry["requests"] == 6 for entry in document["serve"])


def test_bench_markdown_has_one_row_per_system_and_shape(bench_json):
    markdown = (bench_json / "r.md").read_text()
    document = json.loads((bench_json / "r.json").read_text())
    rows = _markdown_table_rows(markdown)
    assert len(rows) == len(document["shapes"]) * len(TINY_SYSTEMS + PEER)
    assert sorted((row[0], row[2]) for row in rows) == sorted(
        (shape["name"], system) for shape in document["shapes"] for system in TINY_SYSTEMS + PEER
    )
    assert "## Expert load" in markdown and "## Cold start" in markdown and "## Serving" in markdown
    assert document["headline"]["system"] in markdown.split("\n\n")[3]  # the headline line, in bold


def test_report_draws_nonempty_pngs(bench_json, tmp_path, capsys):
    assert main(["report", str(bench_json / "r.json"), "-o", str(tmp_path / "report")]) == 0
    for name in ("latency_vs_tokens.png", "tflops.png", "expert_load.png"):
        width, height = _png_size(tmp_path / "report" / name)
        assert width > 100 and height > 100
    assert "![tflops.png](tflops.png)" in (tmp_path / "report" / "report.md").read_text()


def test_report_rejects_a_file_that_is_not_a_bench_result(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "moeflux check", "rows": []}))
    with pytest.raises(SystemExit, match="is not a moeflux bench result"):
        main(["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out")])


def test_bench_default_preset_writes_to_out(tmp_path, capsys):
    assert main(["bench", "--warmup", "1", "--repeat", "2", "--systems", "moeflux-torch,seed-reference",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    document = json.loads((tmp_path / "bench-cpu-small.json").read_text())
    assert validate(document) == []
    assert {row["system"] for row in document["rows"]} == {"seed-reference", "moeflux-torch"}
    assert (tmp_path / "bench-cpu-small.md").read_text().startswith("# moeflux bench: cpu-small")
    captured = capsys.readouterr()
    assert "no CUDA GPU found; running the cpu-small preset" in captured.err
    assert "moeflux-torch:" in captured.out.strip().splitlines()[-1]  # the headline closes the output


def test_bench_train_mode_and_a_shapes_file(tmp_path):
    shapes = [{"hidden": 32, "expert_dim": 16, "experts": 4, "top_k": 2, "tokens": 8}]
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    assert main(["bench", "--shapes", str(tmp_path / "shapes.json"), "--mode", "train", "--warmup", "1", "--repeat",
                 "2", "--systems", "moeflux-torch,torch-grouped-mm,seed-reference", "--json",
                 str(tmp_path / "t.json")]) == 0  # fmt: skip
    document = json.loads((tmp_path / "t.json").read_text())
    assert validate(document) == []
    status = {row["system"]: row["status"] for row in document["rows"]}
    assert status == {"moeflux-torch": "ok", "torch-grouped-mm": "ok", "seed-reference": "skipped"}
    assert document["shapes"][0]["flops"] == 3 * (2 * 8 * 32 * 4 + 2 * 8 * 32 * 3 * 16 * 2)


def test_bench_sweep_preset_at_a_custom_layer(tmp_path):
    assert main(["bench", "--preset", "decode", "--hidden", "32", "--expert-dim", "16", "--experts", "4", "--top-k",
                 "2", "--warmup", "1", "--repeat", "2", "--systems", "moeflux-torch", "--json",
                 str(tmp_path / "d.json")]) == 0  # fmt: skip
    document = json.loads((tmp_path / "d.json").read_text())
    assert [shape["tokens"] for shape in document["shapes"]] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert {shape["layer"] for shape in document["shapes"]} == {"H32 D16 E4 k2"}


def test_bench_flash_expert_preset(tmp_path):
    assert main(["bench", "--preset", "flash-expert-small", "--warmup", "1", "--repeat", "2", "--json",
                 str(tmp_path / "f.json")]) == 0  # fmt: skip
    document = json.loads((tmp_path / "f.json").read_text())
    assert validate(document) == []
    (row,) = [row for row in document["rows"] if row["status"] == "ok"]
    assert row["system"] == "flash-expert-torch" and row["pct_copy_bw"] > 0
    assert document["shapes"][0]["bytes"] == 4 * (2 * 64 * 4 * 64 + 2 * 64 * 64)


def test_bench_flash_expert_without_the_op_skips_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "moeflux.ops.flash_expert", None)  # as if the op were not there
    assert main(["bench", "--preset", "flash-expert-small", "--json", str(tmp_path / "f.json")]) == 0
    document = json.loads((tmp_path / "f.json").read_text())
    assert validate(document) == [] and document["headline"] is None
    assert all(row["status"] == "skipped" and "does not import" in row["note"] for row in document["rows"])


def test_demo_checks_then_prints_the_headline(capsys):
    assert main(["demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("correctness: moeflux-torch passes") and "4/4 shapes" in lines[0]
    assert lines[1].startswith("moeflux-torch: ") and "TFLOP/s" in lines[1] and "torch._grouped_mm" in lines[1]


def test_bench_list_names_presets_and_systems(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "competition" in out and "token-sweep" in out and "hf-qwen3-moe" in out


def test_errors_a_user_can_act_on():
    with pytest.raises(SystemExit, match="valid presets:(.|\n)*qwen3-30b-a3b"):
        main(["bench", "--preset", "qwen4"])
    with pytest.raises(SystemExit, match="missing --experts, --top-k"):
        main(["bench", "--hidden", "64", "--expert-dim", "32"])
    with pytest.raises(SystemExit, match="--layer picks the layer of a sweep preset"):
        main(["bench", "--layer", "qwen3-30b-a3b"])
    with pytest.raises(SystemExit, match="unknown system 'nope'"):
        main(["bench", *TINY, "--systems", "nope"])
