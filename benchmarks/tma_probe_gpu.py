"""Probe: do TMA tensor descriptors and a persistent grid make the grouped GEMMs faster on Hopper?

Issue 4 asks for "persistent kernels and TMA tensor descriptors where they measure faster".
This script times, on the forward's two GEMMs (gathered gate|up with fused SwiGLU; down
projection scaled and scattered), the production kernel of
:mod:`moeflux.ops.grouped_matmul.triton` against an experimental variant of it that loads the
weight tiles (and, for the down GEMM, the input tiles) through device-side TMA descriptors,
launched one program per tile or persistent (one program per SM looping over tiles).
Each variant is checked against the production kernel's output before it is timed.

    PYTHONPATH=src python3 benchmarks/tma_probe_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from _common import git_commit, pick_device, report_path, time_ms, write_report
from moeflux.bench.shapes import competition_shapes, model_shapes
from moeflux.expert_tables import ExpertTables
from moeflux.ops.dispatch import build_dispatch_plan
from moeflux.ops.grouped_matmul import GroupedMatmulConfig, grouped_matmul, select_config


@triton.jit
def _tile(
    x_ptr, x_desc, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr,
    sorted_to_pair_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
    i_m, i_n, N, K, top_k, stride_x_m, stride_out_m,
    GATHER: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr, SCATTER: tl.constexpr, X_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    dtype = x_ptr.dtype.element_ty
    i_e = tl.load(tile_expert_ptr + i_m)
    row_start = tl.load(tile_row_start_ptr + i_m)
    row_end = tl.minimum(row_start + BLOCK_M, tl.load(expert_offsets_ptr + i_e + 1))
    o_r = row_start + tl.arange(0, BLOCK_M)
    m_r = o_r < row_end
    o_r = tl.where(m_r, o_r, row_start)
    if GATHER or SCALE or SCATTER:
        o_pair = tl.load(sorted_to_pair_ptr + o_r)
    if GATHER:
        o_x = o_pair // top_k
    else:
        o_x = o_r
    o_k = tl.arange(0, BLOCK_K)
    p_x = x_ptr + o_x[:, None].to(tl.int64) * stride_x_m + o_k[None, :]
    w_address = tl.load(w_addresses_ptr + i_e)
    w_leading = tl.multiple_of(tl.load(w_leading_strides_ptr + i_e), 8)
    w_desc = tl.make_tensor_descriptor(
        tl.multiple_of(w_address.to(tl.pointer_type(dtype)), 16), shape=[K, N], strides=[w_leading, 1],
        block_shape=[BLOCK_K, BLOCK_N],
    )  # fmt: skip
    if SWIGLU:
        w_up_address = tl.load(w_up_addresses_ptr + i_e)
        w_up_desc = tl.make_tensor_descriptor(
            tl.multiple_of(w_up_address.to(tl.pointer_type(dtype)), 16), shape=[K, N], strides=[w_leading, 1],
            block_shape=[BLOCK_K, BLOCK_N],
        )  # fmt: skip
        b_acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_start = i_n * BLOCK_N
    for k_start in range(0, K, BLOCK_K):
        if X_TMA:
            b_x = x_desc.load([row_start, k_start])
        else:
            b_x = tl.load(p_x)
        b_acc = tl.dot(b_x, w_desc.load([k_start, n_start]), b_acc)
        if SWIGLU:
            b_acc_up = tl.dot(b_x, w_up_desc.load([k_start, n_start]), b_acc_up)
        p_x += BLOCK_K
    if SWIGLU:
        b_acc = b_acc * tl.sigmoid(b_acc) * b_acc_up
    if SCALE:
        b_acc = b_acc * tl.load(row_scale_ptr + o_pair)[:, None]
    if SCATTER:
        o_out = o_pair
    else:
        o_out = o_r
    o_n = n_start + tl.arange(0, BLOCK_N)
    p_out = out_ptr + o_out[:, None].to(tl.int64) * stride_out_m + o_n[None, :]
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_r[:, None] & (o_n < N)[None, :])


@triton.jit
def _tma_kernel(
    x_ptr, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr,
    sorted_to_pair_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr,
    N, K, P, max_tiles, top_k, stride_x_m, stride_out_m,
    GATHER: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr, SCATTER: tl.constexpr, X_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    x_desc = x_ptr
    if X_TMA:
        x_desc = tl.make_tensor_descriptor(
            x_ptr, shape=[P, K], strides=[stride_x_m, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n_tiles
    num_m_tiles = tl.load(num_tiles_ptr)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_m_tiles * num_n_tiles, NUM_PROGRAMS):
            first_m = (tile // tiles_per_group) * GROUP_M
            group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
            i_m = first_m + (tile % tiles_per_group) % group_size
            i_n = (tile % tiles_per_group) // group_size
            _tile(
                x_ptr, x_desc, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr,
                sorted_to_pair_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
                i_m, i_n, N, K, top_k, stride_x_m, stride_out_m,
                GATHER, SWIGLU, SCALE, SCATTER, X_TMA, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    else:
        i_pid = tl.program_id(0)
        first_m = (i_pid // tiles_per_group) * GROUP_M
        group_size = tl.minimum(max_tiles - first_m, GROUP_M)
        i_m = first_m + (i_pid % tiles_per_group) % group_size
        i_n = (i_pid % tiles_per_group) // group_size
        if i_m < num_m_tiles:
            _tile(
                x_ptr, x_desc, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr,
                sorted_to_pair_ptr, expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr,
                i_m, i_n, N, K, top_k, stride_x_m, stride_out_m,
                GATHER, SWIGLU, SCALE, SCATTER, X_TMA, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip


def tma_grouped_matmul(x, table, plan, *, gather, swiglu, row_scale, scatter, config, persistent, x_tma):
    plan = plan.with_block_m(config.block_m)
    N, K = table.cols, x.shape[1]
    out = torch.empty(plan.num_pairs, N, device=x.device, dtype=x.dtype)
    num_programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 3
    grid = (num_programs,) if persistent else (plan.max_tiles * triton.cdiv(N, config.block_n),)
    up = table.addresses[1] if swiglu else table.addresses[0]
    scale = row_scale if row_scale is not None else plan.sorted_to_pair
    _tma_kernel[grid](
        x, table.addresses[0], up, table.leading_strides, out, scale, plan.sorted_to_pair, plan.expert_offsets,
        plan.tile_expert, plan.tile_row_start, plan.num_tiles, N, K, x.shape[0], plan.max_tiles, plan.top_k,
        x.stride(0), out.stride(0),
        GATHER=gather, SWIGLU=swiglu, SCALE=row_scale is not None, SCATTER=scatter, X_TMA=x_tma,
        PERSISTENT=persistent, NUM_PROGRAMS=num_programs,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def flops(rows: int, n: int, k: int, swiglu: bool) -> float:
    return 2.0 * rows * k * n * (2 if swiglu else 1)


def probe_shape(shape, dtype, device, results: list) -> None:
    torch.manual_seed(0)
    T, H, D = shape.tokens, shape.dhidden, shape.dexpert
    E, S, k = shape.nroutedexperts, shape.nsharedexperts, shape.nexpertspertoken
    gate_up = torch.randn(E + S, H, 2 * D, device=device, dtype=dtype) * H**-0.5
    down = torch.randn(E + S, D, H, device=device, dtype=dtype) * D**-0.5
    x = torch.randn(T, H, device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)])
    tables = ExpertTables.from_packed(gate_up, down, E)
    P = T * (k + S)
    row_scale = torch.rand(P, device=device)
    base_gu = select_config(P, 2 * D, H, dtype, num_experts=E + S, swiglu=True, device=device)
    base_dn = select_config(P, H, D, dtype, num_experts=E + S, device=device)
    plan = build_dispatch_plan(ids, E, num_shared_experts=S, block_m=base_gu.block_m, check_ids=False)
    gemms = {
        "gate_up": dict(x=x, table=tables.gate_up, gather=True, swiglu=True, row_scale=None, scatter=False,
                        base=base_gu, n=D, k=H),
        "down": dict(x=None, table=tables.down, gather=False, swiglu=False, row_scale=row_scale, scatter=True,
                     base=base_dn, n=H, k=D),
    }  # fmt: skip
    hidden = grouped_matmul(x, tables.gate_up, plan, gather=True, swiglu=True, config=base_gu)
    gemms["down"]["x"] = hidden
    for name, g in gemms.items():
        base = g["base"]
        args = dict(gather=g["gather"], swiglu=g["swiglu"], row_scale=g["row_scale"], scatter=g["scatter"])
        reference = grouped_matmul(g["x"], g["table"], plan, config=base, **args)
        total = flops(P, g["n"], g["k"], g["swiglu"])
        row = {"shape": shape.name, "gemm": name, "variants": []}
        t = time_ms(lambda: grouped_matmul(g["x"], g["table"], plan, config=base, **args))
        row["variants"].append({"name": f"production {base}", "ms": t, "tflops": total / t / 1e9})
        candidates = [base]
        if base.block_m >= 64:
            deeper = GroupedMatmulConfig(base.block_m, base.block_n, base.block_k, base.group_m, 8, base.num_stages + 1)
            candidates.append(deeper)
        for cfg in candidates:
            for persistent in (False, True):
                for x_tma in ((False, True) if not g["gather"] else (False,)):
                    label = f"tma persistent={persistent} x_tma={x_tma} {cfg}"
                    try:
                        run = lambda: tma_grouped_matmul(  # noqa: E731
                            g["x"], g["table"], plan, config=cfg, persistent=persistent, x_tma=x_tma, **args
                        )
                        got = run()
                        err = float((got.float() - reference.float()).norm() / reference.float().norm())
                        if not err < 1e-2:
                            row["variants"].append({"name": label, "error": f"rel err {err:.3g}"})
                            continue
                        t = time_ms(run)
                        row["variants"].append({"name": label, "ms": t, "tflops": total / t / 1e9, "rel_err": err})
                    except Exception as error:  # noqa: BLE001 - a probe records what fails
                        row["variants"].append({"name": label, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        best = min((v for v in row["variants"] if "ms" in v), key=lambda v: v["ms"])
        row["best"] = best["name"]
        print(f"{shape.name} {name}: production {row['variants'][0]['ms']:.3f} ms, best {best['ms']:.3f} ms "
              f"({best['name']})", flush=True)  # fmt: skip
        results.append(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    picked = pick_device(smoke=False)
    if picked is None:
        return 1
    device, name = picked
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    results: list = []
    shapes = [(s, torch.float16) for s in competition_shapes("benchmarks")[1:2]]
    shapes += [(s, torch.bfloat16) for s in model_shapes() if s.name.endswith("prefill")]
    for shape, dtype in shapes:
        probe_shape(shape, dtype, device, results)
        torch.cuda.empty_cache()
    lines = [f"TMA / persistent probe on {name}, commit {git_commit()}", ""]
    lines += ["| shape | GEMM | variant | ms | TFLOP/s |", "|---|---|---|---|---|"]
    for row in results:
        for v in row["variants"]:
            lines.append(f"| {row['shape']} | {row['gemm']} | {v['name']} | {v.get('ms', v.get('error'))} | "
                         f"{v.get('tflops', '')} |")  # fmt: skip
    write_report(report_path(args.out, "tma_probe_gpu.json"), {"device": name, "commit": git_commit(),
                 "results": results}, "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
