"""The JSON schema of ``moeflux bench --json`` files, and a validator for the part of JSON
Schema it uses (``type``, ``required``, ``properties``, ``items``, ``enum``, ``minimum``), so
checking a result needs no extra package. The schema is standard JSON Schema (draft 2020-12):
``jsonschema`` accepts it too.

Bump ``schema`` (``moeflux-bench/N``) when a field changes meaning or disappears; adding a
field keeps the version.
"""

from __future__ import annotations

SCHEMA_ID = "moeflux-bench/1"

_NUMBER = {"type": "number"}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}
_STRING = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}

_TIMED_FIELDS = {
    "median_ms": _NUMBER, "p5_ms": _NUMBER, "p95_ms": _NUMBER, "p99_ms": _NUMBER, "mean_ms": _NUMBER,
    "cv": _NUMBER, "repeats": _INT, "warmup": _INT, "tokens_per_s": _NUMBER, "tflops": _NUMBER,
    "pct_peak": _NUMBER, "gbps": _NUMBER, "pct_copy_bw": _NUMBER, "pct_of_floor": _NUMBER,
    "floor_ms": _NUMBER, "peak_mem_mb": _OPTIONAL_NUMBER, "max_abs_err": _NUMBER, "rel_l2": _NUMBER,
    "speedup": _OPTIONAL_NUMBER,
}  # fmt: skip

ROW_SCHEMA = {
    "type": "object",
    "required": ["shape", "layer", "T", "system", "status", "note"],
    "properties": {
        "shape": _STRING, "layer": _STRING, "T": _INT, "system": _STRING,
        "status": {"enum": ["ok", "skipped", "error"]}, "note": _STRING, **_TIMED_FIELDS,
    },  # fmt: skip
    # A timed row carries every metric; the others carry the note saying why not.
    "if": {"properties": {"status": {"const": "ok"}}},
    "then": {"required": list(_TIMED_FIELDS)},
}

SHAPE_SCHEMA = {
    "type": "object",
    "required": ["name", "workload", "layer", "tokens", "params", "flops", "bytes", "floor_ms", "active_experts",
                 "min_tokens_per_expert", "mean_tokens_per_expert", "max_tokens_per_expert", "load_imbalance",
                 "tokens_per_expert"],  # fmt: skip
    "properties": {
        "name": _STRING, "workload": {"enum": ["moe", "flash-expert"]}, "layer": _STRING, "tokens": _INT,
        "params": {"type": "object"}, "flops": _INT, "bytes": _INT, "floor_ms": _NUMBER, "active_experts": _INT,
        "min_tokens_per_expert": _INT, "mean_tokens_per_expert": _NUMBER, "max_tokens_per_expert": _INT,
        "load_imbalance": _NUMBER, "tokens_per_expert": {"type": ["array", "null"], "items": _INT},
    },  # fmt: skip
}

RESULT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "moeflux bench results",
    "type": "object",
    "required": ["schema", "kind", "env", "settings", "calibration", "systems", "shapes", "rows", "cold_start",
                 "serve", "headline"],  # fmt: skip
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "kind": {"const": "moeflux bench"},
        "env": {
            "type": "object",
            "required": ["device", "torch", "triton", "python", "date", "commit"],
            "properties": {key: _STRING for key in ("device", "torch", "triton", "python", "date", "commit")},
        },
        "settings": {
            "type": "object",
            "required": ["preset", "workload", "dtype", "mode", "warmup", "repeat", "timer", "systems", "baseline"],
            "properties": {
                "preset": _STRING, "workload": {"enum": ["moe", "flash-expert"]}, "dtype": _STRING,
                "mode": {"enum": ["forward", "train"]}, "warmup": _INT, "repeat": _INT, "timer": _STRING,
                "systems": {"type": "array", "items": _STRING}, "baseline": {"type": ["string", "null"]},
            },  # fmt: skip
        },
        "calibration": {
            "type": "object",
            "required": ["dtype", "gemm_size", "gemm_tflops", "copy_mib", "copy_gbps"],
            "properties": {"dtype": _STRING, "gemm_size": _INT, "gemm_tflops": _NUMBER, "copy_mib": _INT,
                           "copy_gbps": _NUMBER},  # fmt: skip
        },
        "systems": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "description", "available", "note"],
                "properties": {"name": _STRING, "description": _STRING, "available": {"type": "boolean"},
                               "note": _STRING},  # fmt: skip
            },
        },
        "shapes": {"type": "array", "items": SHAPE_SCHEMA},
        "rows": {"type": "array", "items": ROW_SCHEMA},
        "cold_start": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["system", "shape", "startup_s", "first_call_cold_ms", "first_call_warm_ms", "steady_ms"],
                "properties": {"system": _STRING, "shape": _STRING, "startup_s": _OPTIONAL_NUMBER,
                               "first_call_cold_ms": _OPTIONAL_NUMBER, "first_call_warm_ms": _OPTIONAL_NUMBER,
                               "steady_ms": _OPTIONAL_NUMBER, "note": _STRING},  # fmt: skip
            },
        },
        "serve": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["system", "layer", "requests", "tokens", "total_ms", "tokens_per_s", "p50_ms", "p95_ms",
                             "p99_ms", "decode_p50_ms", "prefill_p50_ms"],  # fmt: skip
                "properties": {"system": _STRING, "layer": _STRING, "requests": _INT, "tokens": _INT,
                               "total_ms": _NUMBER, "tokens_per_s": _NUMBER, "p50_ms": _NUMBER, "p95_ms": _NUMBER,
                               "p99_ms": _NUMBER, "decode_p50_ms": _OPTIONAL_NUMBER,
                               "prefill_p50_ms": _OPTIONAL_NUMBER},  # fmt: skip
            },
        },
        "headline": {
            "type": ["object", "null"],
            "required": ["system", "baseline", "shapes", "median_ms", "tflops", "pct_peak", "gbps", "pct_copy_bw",
                         "speedup"],
            "properties": {"system": _STRING, "baseline": {"type": ["string", "null"]}, "shapes": _INT,
                           "median_ms": _NUMBER, "tflops": _NUMBER, "pct_peak": _NUMBER, "gbps": _NUMBER,
                           "pct_copy_bw": _NUMBER,
                           "speedup": _OPTIONAL_NUMBER},  # fmt: skip
        },
    },
}

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "number": (int, float), "integer": int,
}  # fmt: skip


def validate(document, schema: dict = RESULT_SCHEMA, path: str = "$") -> list[str]:
    """Every place ``document`` breaks ``schema``, as ``"$.rows[3].median_ms: ..."`` lines
    (empty when it conforms)."""
    problems: list[str] = []
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(document, name) for name in allowed):
            return [f"{path}: expected {' or '.join(allowed)}, got {type(document).__name__}"]
    if "const" in schema and document != schema["const"]:
        problems.append(f"{path}: expected {schema['const']!r}, got {document!r}")
    if "enum" in schema and document not in schema["enum"]:
        problems.append(f"{path}: {document!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is_type(document, "number") and document < schema["minimum"]:
        problems.append(f"{path}: {document} is below {schema['minimum']}")
    if isinstance(document, dict):
        required = list(schema.get("required", []))
        if "if" in schema and not validate(document, schema["if"], path):
            required += schema["then"].get("required", [])
        problems += [f"{path}: missing {key!r}" for key in required if key not in document]
        for key, subschema in schema.get("properties", {}).items():
            if key in document:
                problems += validate(document[key], subschema, f"{path}.{key}")
    if isinstance(document, list) and "items" in schema:
        for i, item in enumerate(document):
            problems += validate(item, schema["items"], f"{path}[{i}]")
    return problems


def _is_type(value, name: str) -> bool:
    if isinstance(value, bool) and name in ("number", "integer"):
        return False  # JSON booleans are not numbers
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[name])
