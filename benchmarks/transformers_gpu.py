"""GPU check and timing of the transformers drop-in (``moeflux.integrations.transformers``).

    PYTHONPATH=src python3 benchmarks/transformers_gpu.py --out $OUT

1. Checks, per architecture (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3), on a random
   model of ``CHECK_SIZES`` (2 decoder layers, H=1024, D=512, 32 experts, 2 x 128 tokens):
   * bfloat16: logits, loss and the gradient of every parameter of the patched model
     (``apply_moeflux``, backend ``auto``: Triton) and of the original, each against the
     original in float32 (no TF32). Target: the patched rel-L2 at most ``RATIO_TARGET`` x the
     original's plus ``FLOOR`` for the logits and loss, the gradients all together and each
     parameter's gradient.
   * float32: 20 greedy tokens from 2 prompts identical to the original's, and the logits'
     rel-L2 below ``FLOAT32_TOL``.
2. Timing (bfloat16, medians of ``triton.testing.do_bench``): the sparse-MoE block alone
   (router, routed experts and the shared expert where the model has one), with random
   weights at each model's layer shape: Qwen3-30B-A3B, Mixtral-8x7B and the DeepSeek-V3 slice
   of ``moeflux/data/models.json`` (prefill and decode), OLMoE-1B-7B and Qwen1.5-MoE-A2.7B
   (prefill). Forward (no grad) and forward + backward (``torch.autograd.grad`` of the input
   and every block parameter), of the original with transformers' ``grouped_mm`` experts (its
   default on a GPU) and its ``eager`` loop, and of the patched block (same module, same
   weights). TFLOP/s from ``Shape.flops``. Then, while ``BUDGET_S`` lasts, the patched block
   once more with its expert parameters re-laid out (``relayout_experts``: one copy, same
   values) so that moeflux reads row-major rather than the model's column-major weights: what
   packing at patch time would buy. No row starts after ``BUDGET_S``.
3. A Markdown table on stdout, JSON and Markdown under ``--out`` (default ``$OUT``). Exit 1 if
   a check fails.

``--smoke`` runs tiny sizes (on the CPU with TRITON_INTERPRET=1, where ``auto`` is the torch
backend) to test the script itself.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

from _common import pick_device, rel_l2, report_path, run_info, time_ms, write_report
import torch
import transformers
import triton

from moeflux.bench.shapes import Shape, model_shapes
from moeflux.integrations.transformers import ARCHITECTURES, apply_moeflux, revert_moeflux

RATIO_TARGET = 1.5
FLOOR = 2e-3  # absolute slack on a rel-L2 (bfloat16 rounding is 4e-3)
# Each parameter's gradient alone: looser (a few hundred elements see routing flips), still
# far below the rel-L2 of 1 a wrong gradient has.
PARAM_RATIO_TARGET, PARAM_FLOOR = 2.0, 1e-2
FLOAT32_TOL = 1e-4
NEW_TOKENS, SMOKE_NEW_TOKENS = 20, 3
BUDGET_S = 120  # no timing row starts after this, so the whole run stays under 3 minutes on an H100

# Layer shapes not in models.json, from the models' published configs.
EXTRA_SHAPES = {
    "olmoe": Shape("olmoe-1b-7b-prefill", 2048, 1024, 64, 0, 8, 1, 4096, 7),
    # shared_expert_intermediate_size 5632 = 4 x moe_intermediate_size 1408
    "qwen2_moe": Shape("qwen1.5-moe-a2.7b-prefill", 2048, 1408, 60, 4, 4, 1, 4096, 8),
}
MODEL_OF_SHAPE = {"qwen3": "qwen3_moe", "mixtral": "mixtral", "deepseek": "deepseek_v3"}
BLOCK_CLASSES = {
    "qwen3_moe": "Qwen3MoeSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock",
    "mixtral": "MixtralSparseMoeBlock", "deepseek_v3": "DeepseekV3MoE",
}  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """A random model for the checks: ``layers`` decoder layers of ``hidden`` width."""

    hidden: int
    expert: int
    experts: int
    layers: int
    vocab: int
    heads: int
    batch: int
    seqlen: int


CHECK_SIZES = Sizes(hidden=1024, expert=512, experts=32, layers=2, vocab=2048, heads=8, batch=2, seqlen=128)
SMOKE_CHECK_SIZES = Sizes(hidden=32, expert=16, experts=8, layers=2, vocab=64, heads=4, batch=2, seqlen=6)
TOP_K = {"qwen3_moe": 8, "qwen2_moe": 4, "olmoe": 8, "mixtral": 2, "deepseek_v3": 8}
SMOKE_TOP_K = 2


def model_config(model_type: str, *, hidden: int, expert: int, experts: int, top_k: int, shared: int,
                 layers: int = 1, vocab: int = 256, heads: int = 4):  # fmt: skip
    """A transformers config of ``model_type`` whose MoE layers have these sizes; ``shared``:
    the shared expert's width in units of ``expert`` (``S``), where the model has one."""
    head_dim = hidden // heads
    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=4096, bos_token_id=1, eos_token_id=None, pad_token_id=0,
        tie_word_embeddings=False, initializer_range=1.0 / math.sqrt(hidden), num_experts_per_tok=top_k,
    )  # fmt: skip
    per_model = {
        "qwen3_moe": dict(num_experts=experts, moe_intermediate_size=expert, norm_topk_prob=True, head_dim=head_dim,
                          intermediate_size=4 * expert),
        "qwen2_moe": dict(num_experts=experts, moe_intermediate_size=expert, norm_topk_prob=False,
                          shared_expert_intermediate_size=max(shared, 1) * expert, intermediate_size=4 * expert),
        "olmoe": dict(num_experts=experts, intermediate_size=expert, norm_topk_prob=False),
        "mixtral": dict(num_local_experts=experts, intermediate_size=expert, head_dim=head_dim),
        # DeepSeek-V3's routing (8 groups, the 4 best kept, scaled by 2.5) on E experts.
        "deepseek_v3": dict(n_routed_experts=experts, moe_intermediate_size=expert, n_shared_experts=max(shared, 1),
                            n_group=8 if experts % 8 == 0 and experts >= 16 else 1,
                            topk_group=4 if experts % 8 == 0 and experts >= 16 else 1,
                            norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=0,
                            intermediate_size=4 * expert, q_lora_rank=None, kv_lora_rank=head_dim,
                            qk_rope_head_dim=head_dim // 2, qk_nope_head_dim=head_dim // 2, v_head_dim=head_dim),
    }  # fmt: skip
    return transformers.AutoConfig.for_model(model_type, **common, **per_model[model_type])


def randomise_bias(model: torch.nn.Module) -> None:
    """DeepSeek's correction bias starts at zero; random values make it change the choice."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.05)


# --- 1. checks -------------------------------------------------------------------------------


def forward_backward(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    grads = {name: p.grad.detach().float() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), out.loss.detach().float(), grads


def check_model(model_type: str, sizes: Sizes, top_k: int, new_tokens: int, device: torch.device) -> dict:
    config = model_config(model_type, hidden=sizes.hidden, expert=sizes.expert, experts=sizes.experts, top_k=top_k,
                          shared=1, layers=sizes.layers, vocab=sizes.vocab, heads=sizes.heads)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (.to: in case from_config builds elsewhere)
        reference = transformers.AutoModelForCausalLM.from_config(config).to(device)
    randomise_bias(reference)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, sizes.vocab, (sizes.batch, sizes.seqlen), generator=generator).to(device)
    prompt = input_ids[:, : max(sizes.seqlen // 8, 4)]
    row = {"model_type": model_type, "sizes": asdict(sizes), "top_k": top_k}

    # float32: the patched model against the original, greedy tokens included.
    ref_logits, ref_loss, ref_grads = forward_backward(reference, input_ids)
    with torch.no_grad():
        ref_tokens = reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    patched = apply_moeflux(copy.deepcopy(reference))
    with torch.no_grad():
        logits32 = patched(input_ids).logits.float()
        tokens32 = patched.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    del patched
    differ = (tokens32 != ref_tokens).any(dim=0).nonzero()
    row["float32"] = {
        "logits_rel_l2": rel_l2(logits32, ref_logits),
        "tokens_identical": bool(torch.equal(tokens32, ref_tokens)),
        "first_differing_position": int(differ[0]) - prompt.shape[1] if len(differ) else None,
    }

    # bfloat16: the original and the patched model, each against the float32 original.
    model16 = copy.deepcopy(reference).to(torch.bfloat16)
    del reference
    errors = {}
    for name in ("original", "moeflux"):
        if name == "moeflux":
            apply_moeflux(model16)
        logits, loss, grads = forward_backward(model16, input_ids)
        all_grads = torch.cat([g.flatten() for g in grads.values()])
        errors[name] = {
            "logits": rel_l2(logits, ref_logits),
            "loss": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
            "grads": rel_l2(all_grads, torch.cat([ref_grads[n].flatten() for n in grads])),
            "per_param": {n: rel_l2(g, ref_grads[n]) for n, g in grads.items()},
        }
    del model16
    original, ours = errors["original"], errors["moeflux"]
    within = lambda mine, theirs: mine <= RATIO_TARGET * theirs + FLOOR  # noqa: E731
    param_within = lambda mine, theirs: mine <= PARAM_RATIO_TARGET * theirs + PARAM_FLOOR  # noqa: E731
    worst = max(ours["per_param"], key=lambda n: ours["per_param"][n] - PARAM_RATIO_TARGET * original["per_param"][n])
    row["bfloat16"] = {
        "original": {k: original[k] for k in ("logits", "loss", "grads")},
        "moeflux": {k: ours[k] for k in ("logits", "loss", "grads")},
        "worst_param": worst, "worst_param_moeflux": ours["per_param"][worst],
        "worst_param_original": original["per_param"][worst],
    }  # fmt: skip
    failures = [k for k in ("logits", "loss", "grads") if not within(ours[k], original[k])]
    failures += [
        f"grad {n}" for n in ours["per_param"] if not param_within(ours["per_param"][n], original["per_param"][n])
    ]
    if not row["float32"]["tokens_identical"]:
        failures.append("float32 greedy tokens")
    if not row["float32"]["logits_rel_l2"] < FLOAT32_TOL:
        failures.append("float32 logits")
    row["failures"] = failures
    row["ok"] = not failures
    free_memory()
    return row


CHECK_HEADER = (
    "| model | fp32 logits rel-L2 | fp32 greedy tokens | bf16 logits (moeflux / original) | bf16 loss | "
    "bf16 all grads | worst param (moeflux / original) | ok |\n|---|---|---|---|---|---|---|---|"
)


def check_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model_type']} | {row['error']} |  |  |  |  |  | FAIL |"
    f32, b16 = row["float32"], row["bfloat16"]
    pair = lambda key: f"{b16['moeflux'][key]:.2e} / {b16['original'][key]:.2e}"  # noqa: E731
    tokens = "identical" if f32["tokens_identical"] else f"differ from {f32['first_differing_position']}"
    return (
        f"| {row['model_type']} | {f32['logits_rel_l2']:.1e} | {tokens} | {pair('logits')} | {pair('loss')} "
        f"| {pair('grads')} | {b16['worst_param']}: {b16['worst_param_moeflux']:.2e} / "
        f"{b16['worst_param_original']:.2e} | {'yes' if row['ok'] else 'NO: ' + ', '.join(row['failures'])} |"
    )


# --- 2. timing -------------------------------------------------------------------------------


def timing_shapes(smoke: bool) -> list[tuple[str, Shape]]:
    shapes = [(MODEL_OF_SHAPE[s.name.split("-")[0]], s) for s in model_shapes()]
    shapes += list(EXTRA_SHAPES.items())
    if smoke:  # the same rows at toy sizes
        shapes = [(m, replace(s, dhidden=64, dexpert=32, nroutedexperts=16, nexpertspertoken=min(s.nexpertspertoken, 4),
                              bs=1, seqlen=16 if s.tokens > 64 else 4)) for m, s in shapes]  # fmt: skip
    return shapes


def build_block(model_type: str, shape: Shape, device: torch.device, dtype: torch.dtype):
    """``(block, config)``: the model's sparse-MoE block at ``shape`` with random weights
    (std 1/sqrt(fan-in)), its experts set to ``grouped_mm``."""
    config = model_config(model_type, hidden=shape.dhidden, expert=shape.dexpert, experts=shape.nroutedexperts,
                          top_k=shape.nexpertspertoken, shared=shape.nsharedexperts)  # fmt: skip
    config._experts_implementation = "grouped_mm"
    modeling = importlib.import_module(ARCHITECTURES[model_type].module)
    # Built on the meta device, then given storage in the run's dtype: no random init on the host.
    with torch.device("meta"):
        block = getattr(modeling, BLOCK_CLASSES[model_type])(config)
    block = block.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    randomise_bias(block)
    return block, config


def one_call_ms(fn) -> float:
    """One call, timed: what ``--smoke`` needs to see the row filled."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def relayout_experts(block: torch.nn.Module) -> None:
    """Store the fused expert parameters so that their transposes, which moeflux reads, are
    contiguous (same values and logical shapes; one copy)."""
    with torch.no_grad():
        for module in block.modules():
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter) and param.dim() == 3:
                    param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)


def time_shape(model_type: str, shape: Shape, device: torch.device, smoke: bool, row_major: bool = False) -> dict:
    """The block's timings: the original (grouped_mm, eager) and patched; with ``row_major``
    only the patched block, its expert parameters re-laid out (``relayout_experts``)."""
    dtype = torch.bfloat16
    row = {"model_type": model_type, "shape": shape.name, "T": shape.tokens, "H": shape.dhidden, "D": shape.dexpert,
           "E": shape.nroutedexperts, "k": shape.nexpertspertoken, "S": shape.nsharedexperts}  # fmt: skip
    block, config = build_block(model_type, shape, device, dtype)
    if row_major:
        relayout_experts(block)
    generator = torch.Generator(device=device).manual_seed(shape.seed)
    x = torch.randn(1, shape.tokens, shape.dhidden, device=device, dtype=dtype, generator=generator)
    grad_out = torch.randn_like(x)
    x_grad = x.detach().requires_grad_(True)
    params = [p for p in block.parameters()]

    def forward():
        with torch.no_grad():
            return block(x)

    def forward_backward():
        return torch.autograd.grad(block(x_grad), [x_grad, *params], grad_out)

    systems = [("grouped_mm", "grouped_mm"), ("eager", "eager"), ("moeflux", None)]
    if row_major:
        systems = [("moeflux_row_major", None)]
    for name, implementation in systems:
        if implementation is None:
            apply_moeflux(block)
        else:
            config._experts_implementation = implementation
        for mode, fn in (("forward", forward), ("train", forward_backward)):
            try:
                ms = one_call_ms(fn) if smoke else time_ms(fn, quick=True)
                row[f"{name}_{mode}_ms"] = ms
                row[f"{name}_{mode}_tflops"] = shape.flops(mode) / ms / 1e9
            except torch.OutOfMemoryError:
                row[f"{name}_{mode}_ms"] = None
                row.setdefault("errors", []).append(f"{name} {mode}: out of memory")
            free_memory()
    revert_moeflux(block)
    for mode in ("forward", "train"):
        ours, theirs = row.get(f"moeflux_{mode}_ms"), row.get(f"grouped_mm_{mode}_ms")
        row[f"speedup_{mode}"] = theirs / ours if ours and theirs else None
    return row


LAYOUT_HEADER = (
    "| shape | T | fwd moeflux ms: model layout / row-major copy "
    "| fwd+bwd moeflux ms: model layout / row-major copy |\n"
    "|---|---|---|---|"
)


def layout_row(row: dict) -> str:
    pair = lambda mode: f"{fmt(row.get(f'moeflux_{mode}_ms'))} / {fmt(row.get(f'moeflux_row_major_{mode}_ms'))}"  # noqa: E731
    return f"| {row['shape']} | {row['T']} | {pair('forward')} | {pair('train')} |"


TIME_HEADER = (
    "| shape | model | T | fwd moeflux ms | fwd grouped_mm ms | fwd eager ms | fwd speed-up | fwd+bwd moeflux ms "
    "| fwd+bwd grouped_mm ms | fwd+bwd eager ms | fwd+bwd speed-up | moeflux fwd / fwd+bwd TFLOP/s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def time_row(row: dict) -> str:
    cells = [row["shape"], row["model_type"], str(row["T"])]
    for mode in ("forward", "train"):
        cells += [fmt(row.get(f"{name}_{mode}_ms")) for name in ("moeflux", "grouped_mm", "eager")]
        cells.append(fmt(row.get(f"speedup_{mode}"), ".2f", "x"))
    cells.append(f"{fmt(row.get('moeflux_forward_tflops'), '.0f')} / {fmt(row.get('moeflux_train_tflops'), '.0f')}")
    notes = "; ".join(row.get("errors", []))
    return "| " + " | ".join(cells) + " |" + (f" {notes}" if notes else "")


def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder (or .json path) for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script itself")
    parser.add_argument("--only", default=None, help="only the architectures whose model_type contains this text")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    picked = pick_device(args.smoke)
    if picked is None:
        return 2
    device, gpu = picked
    print(f"# moeflux transformers drop-in on {gpu}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, triton {triton.__version__}\n")  # fmt: skip
    wanted = [m for m in ARCHITECTURES if args.only is None or args.only in m]

    checks = []
    print(CHECK_HEADER)
    for model_type in wanted:
        if args.smoke:
            sizes, top_k, new_tokens = SMOKE_CHECK_SIZES, SMOKE_TOP_K, SMOKE_NEW_TOKENS
        else:
            sizes, top_k, new_tokens = CHECK_SIZES, TOP_K[model_type], NEW_TOKENS
        try:
            checks.append(check_model(model_type, sizes, top_k, new_tokens, device))
        except Exception as error:  # one architecture failing must not hide the others
            checks.append({"model_type": model_type, "error": f"{type(error).__name__}: {error}", "ok": False})
            free_memory()
        print(check_row(checks[-1]))
        sys.stdout.flush()

    rows = []
    timed = [(model_type, shape) for model_type, shape in timing_shapes(args.smoke) if model_type in wanted]
    print(f"\n{TIME_HEADER}")
    for model_type, shape in timed:
        if time.perf_counter() - started > BUDGET_S:
            rows.append({"model_type": model_type, "shape": shape.name, "T": shape.tokens,
                         "errors": ["skipped: time budget spent"]})  # fmt: skip
        else:
            try:
                rows.append(time_shape(model_type, shape, device, args.smoke))
            except Exception as error:  # one shape failing must not hide the others
                rows.append({"model_type": model_type, "shape": shape.name, "T": shape.tokens,
                             "errors": [f"{type(error).__name__}: {error}"]})  # fmt: skip
            free_memory()  # the block and its gradients are gone with time_shape's frame
        print(time_row(rows[-1]))
        sys.stdout.flush()

    # While the budget lasts: the patched block with its experts re-laid out so that moeflux
    # reads row-major weights (what a one-time copy at patch time would buy).
    layout_rows = []
    for (model_type, shape), row in zip(timed, rows, strict=True):
        if "moeflux_forward_ms" not in row or time.perf_counter() - started > BUDGET_S:
            continue
        try:
            extra = time_shape(model_type, shape, device, args.smoke, row_major=True)
            row.update({key: value for key, value in extra.items() if key.startswith("moeflux_row_major_")})
            row.setdefault("errors", []).extend(extra.get("errors", []))
        except Exception as error:
            row.setdefault("errors", []).append(f"row-major copy: {type(error).__name__}: {error}")
        free_memory()
        layout_rows.append(row)

    checks_ok = all(c["ok"] for c in checks)
    speedups = {mode: geomean(r.get(f"speedup_{mode}") for r in rows) for mode in ("forward", "train")}
    summary = "\n".join([
        (f"moeflux transformers drop-in on {gpu} (torch {torch.__version__}, transformers "
         f"{transformers.__version__}); checks: {'all passed' if checks_ok else 'FAILURES'}"),
        "", "Checks (rel-L2 against the original model in float32):", "", CHECK_HEADER, *map(check_row, checks),
        "", "Sparse-MoE block alone, bfloat16, random weights (speed-up: over transformers' grouped_mm experts):", "",
        TIME_HEADER, *map(time_row, rows), "",
        ("moeflux reading the model's fused experts in place (column-major) or a row-major copy (while the "
         "budget lasted):"), "", LAYOUT_HEADER, *map(layout_row, layout_rows), "",
        (f"geomean speed-up over grouped_mm: forward {fmt(speedups['forward'], '.2f', 'x')}, "
         f"forward + backward {fmt(speedups['train'], '.2f', 'x')}"), "",
    ])  # fmt: skip
    print("\n" + summary)
    report = {
        **run_info(gpu), "transformers": transformers.__version__, "smoke": args.smoke, "ratio_target": RATIO_TARGET, "floor": FLOOR,
        "checks_ok": checks_ok, "checks": checks, "timing": rows, "geomean_speedup": speedups,
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    json_path = report_path(args.out, "transformers_gpu.json")
    write_report(json_path, report, summary)
    print(f"wrote {json_path} ({report['wall_s']:.0f} s)")
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
