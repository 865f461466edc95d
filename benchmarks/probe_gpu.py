"""GPU facts the design leans on, checked on the device itself.

1. Which experts ``torch.topk`` keeps among tied half-precision scores (the competition's
   reference ranks fp16 softmax scores, where ties are common).
2. Whether moeflux's routing picks the same expert sets as the reference on the
   competition's own inputs (all six shapes).
3. Whether ``torch._grouped_mm`` runs in fp16 and bf16 on this GPU.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from moeflux import gpumode
from moeflux.bench.shapes import competition_shapes
from moeflux.ops.routing import route


def topk_ties() -> dict:
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.1, 0.3]], device="cuda", dtype=torch.float16)
    kept = {}
    for sorted_ in (False, True):
        kept[f"sorted={sorted_}"] = sorted(torch.topk(scores, k=2, sorted=sorted_).indices[0].tolist())
    return kept


def routing_agreement() -> list[dict]:
    rows = []
    for shape in competition_shapes("tests") + competition_shapes("benchmarks"):
        x, w, cfg = gpumode.generate_input(**shape.seed_args(), device="cuda")
        tokens = x.reshape(-1, x.shape[-1])
        logits = F.linear(tokens, w["router.weight"])
        reference = torch.topk(logits.softmax(-1), cfg["n_experts_per_token"], dim=-1, sorted=False).indices
        ref_sets = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, reference, True)
        row = {"shape": shape.name}
        for backend in ("torch", "triton"):
            ids = route(logits, cfg["n_experts_per_token"], backend=backend).expert_ids
            sets = torch.zeros_like(ref_sets).scatter_(1, ids, True)
            row[f"tokens_differing_{backend}"] = int((sets != ref_sets).any(1).sum())
        rows.append(row)
        del x, w
    return rows


def grouped_mm_support() -> dict:
    support = {}
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.randn(64, 32, device="cuda", dtype=dtype)
        b = torch.randn(2, 32, 48, device="cuda", dtype=dtype)
        offs = torch.tensor([24, 64], device="cuda", dtype=torch.int32)
        try:
            out = torch._grouped_mm(a, b, offs=offs)
            ref = torch.cat([a[:24] @ b[0], a[24:] @ b[1]])
            support[str(dtype)] = f"ok, max err {(out - ref).abs().max().item():.3g}"
        except Exception as error:  # noqa: BLE001 - recording what the GPU refuses
            support[str(dtype)] = f"{type(error).__name__}: {str(error)[:200]}"
    return support


if __name__ == "__main__":
    result = {"device": torch.cuda.get_device_name(), "topk_ties_kept": topk_ties(),
              "routing_vs_reference": routing_agreement(), "grouped_mm": grouped_mm_support()}  # fmt: skip
    print(json.dumps(result, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
