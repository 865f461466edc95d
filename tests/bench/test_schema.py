"""The result schema's validator catches what it must."""

import copy

import pytest

from moeflux.bench.schema import RESULT_SCHEMA, ROW_SCHEMA, validate

TIMED_ROW = {
    "shape": "s", "layer": "H8 D4 E2 k1", "T": 4, "system": "moeflux-torch", "status": "ok", "note": "",
    "median_ms": 1.0, "p5_ms": 0.9, "p95_ms": 1.1, "p99_ms": 1.2, "mean_ms": 1.0, "cv": 0.01, "repeats": 20,
    "warmup": 3, "tokens_per_s": 4000.0, "tflops": 0.1, "pct_peak": 10.0, "gbps": 1.0, "pct_copy_bw": 5.0,
    "pct_of_floor": 50.0, "floor_ms": 0.5, "peak_mem_mb": None, "max_abs_err": 0.0, "rel_l2": 0.0, "speedup": 1.0,
}  # fmt: skip


def test_a_timed_row_validates():
    assert validate(TIMED_ROW, ROW_SCHEMA) == []


def test_a_timed_row_needs_every_metric_and_a_skipped_row_does_not():
    row = {key: value for key, value in TIMED_ROW.items() if key != "p99_ms"}
    assert validate(row, ROW_SCHEMA) == ["$: missing 'p99_ms'"]
    skipped = {"shape": "s", "layer": "l", "T": 4, "system": "x", "status": "skipped", "note": "why"}
    assert validate(skipped, ROW_SCHEMA) == []


def test_wrong_types_and_values_are_named_with_their_path():
    row = dict(TIMED_ROW, median_ms="fast", status="great", T=-1, repeats=True)
    problems = validate(row, ROW_SCHEMA, "$.rows[0]")
    assert "$.rows[0].median_ms: expected number, got str" in problems
    assert any(p.startswith("$.rows[0].status: 'great' is not one of") for p in problems)
    assert "$.rows[0].T: -1 is below 0" in problems
    assert "$.rows[0].repeats: expected integer, got bool" in problems


def test_the_schema_is_standard_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(RESULT_SCHEMA)
    broken = dict(TIMED_ROW)
    del broken["rel_l2"]
    assert not jsonschema.Draft202012Validator(ROW_SCHEMA).is_valid(broken)
    assert jsonschema.Draft202012Validator(ROW_SCHEMA).is_valid(copy.deepcopy(TIMED_ROW))
