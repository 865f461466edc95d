"""Probe: where do the forward's grouped GEMMs lose against cuBLAS?

The grouped GEMMs run at 520-575 TFLOP/s where a dense cuBLAS product of the same size runs at
720-770. This times, on the same inputs and in interleaved rounds, variants that each remove
one ingredient of the library's kernel, to see which ingredient costs what:

gate|up (SwiGLU) GEMM
  ``library``          the library's kernel: gathered rows, two dots (gate, up) per K step.
  ``library_sorted``   the same on rows gathered beforehand (TMA loads of the input).
  ``plain_2d``         the library's plain GEMM on the packed [K, 2D] weight: one 128x256 dot,
                       no SwiGLU, 2D output columns (what the two dots cost against one).
  ``one_dot_concat``   probe kernel: gate and up column blocks loaded as one [BK, 2BN] tile,
                       one dot, accumulator split into halves for SwiGLU.
  ``one_dot_inter8``   the same, gate and up alternating every 8 columns of the tile, so a
                       thread's accumulator holds matching gate and up values.
  ``cublas``           dense ``[P, H] @ [H, 2D]`` (the ceiling).
down GEMM
  ``library``          row-scaled, scattered to pair order.
  ``library_plain``    no scale, no scatter (sorted order out).
  ``persistent``       probe kernel: one program per SM walking tiles, input through TMA,
                       weights through pointers, loops flattened so a tile's epilogue
                       overlaps the next tile's loads.
  ``persistent_wtma``  the same with the weights through device-built TMA descriptors.
  ``cublas``           dense ``[P, D] @ [D, H]``.

    PYTHONPATH=src python3 benchmarks/gemm_gap_probe_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from _common import git_commit, pick_device, rel_l2, report_path, time_ms, write_report
from moe_forward_gpu import forward_gemms, load_shapes, make_inputs
from moeflux.ops.grouped_matmul import GroupedMatmulConfig, WeightTable, grouped_matmul, heuristic_config
from moeflux.ops.experts.triton import pair_weights

ROUNDS = 3


@triton.jit
def _tile_of(pid, max_tiles, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(max_tiles - first_m, GROUP_M)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _swiglu_one_dot_kernel(
    x_ptr, w_addresses_ptr, w_up_addresses_ptr, w_leading_strides_ptr, out_ptr, sorted_to_pair_ptr,
    expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr, N, K, max_tiles, top_k,
    stride_x_m, stride_out_m, INTERLEAVE: tl.constexpr, W_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    i_m, i_n = _tile_of(tl.program_id(0), max_tiles, N, BLOCK_N, GROUP_M)
    if i_m >= tl.load(num_tiles_ptr):
        return
    i_e = tl.load(tile_expert_ptr + i_m)
    row_start = tl.load(tile_row_start_ptr + i_m)
    row_end = tl.minimum(row_start + BLOCK_M, tl.load(expert_offsets_ptr + i_e + 1))
    o_r = row_start + tl.arange(0, BLOCK_M)
    m_r = o_r < row_end
    o_r = tl.where(m_r, o_r, row_start)
    o_x = tl.load(sorted_to_pair_ptr + o_r) // top_k
    o_k = tl.arange(0, BLOCK_K)
    p_x = x_ptr + o_x[:, None].to(tl.int64) * stride_x_m + o_k[None, :]
    dtype = out_ptr.dtype.element_ty
    w_address = tl.load(w_addresses_ptr + i_e)
    p_w_e = tl.multiple_of(w_address.to(tl.pointer_type(dtype)), W_ALIGN)
    stride_w_k = tl.multiple_of(tl.load(w_leading_strides_ptr + i_e), W_ALIGN // 2)
    w_up_offset = tl.multiple_of((tl.load(w_up_addresses_ptr + i_e) - w_address) // 2, W_ALIGN // 2)
    c = tl.arange(0, 2 * BLOCK_N)
    if INTERLEAVE:
        half = (c // 8) % 2
        col = (c // 16) * 8 + c % 8
    else:
        half = c // BLOCK_N
        col = c % BLOCK_N
    o_w_n = (i_n * BLOCK_N + col) % N
    p_w = p_w_e + o_k[:, None] * stride_w_k + (o_w_n + half * w_up_offset)[None, :]
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(p_x), tl.load(p_w), acc)
        p_x += BLOCK_K
        p_w += BLOCK_K * stride_w_k
    if INTERLEAVE:
        pairs = tl.reshape(tl.permute(tl.reshape(acc, [BLOCK_M, BLOCK_N // 8, 2, 8]), [0, 1, 3, 2]),
                           [BLOCK_M, BLOCK_N, 2])  # fmt: skip
    else:
        pairs = tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1])
    gate, up = tl.split(pairs)
    hidden = gate * tl.sigmoid(gate) * up
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_out = out_ptr + o_r[:, None].to(tl.int64) * stride_out_m + o_n[None, :]
    tl.store(p_out, hidden.to(dtype), mask=m_r[:, None] & (o_n < N)[None, :])


@triton.jit
def _persistent_down_kernel(
    x_desc, w_addresses_ptr, w_leading_strides_ptr, out_ptr, row_scale_ptr, sorted_to_pair_ptr,
    expert_offsets_ptr, tile_expert_ptr, tile_row_start_ptr, num_tiles_ptr, N, K, stride_out_m,
    W_TMA: tl.constexpr, NUM_SMS: tl.constexpr, W_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    num_m = tl.load(num_tiles_ptr)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    o_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        i_m, i_n = _tile_of(tile, num_m, N, BLOCK_N, GROUP_M)
        i_e = tl.load(tile_expert_ptr + i_m)
        row_start = tl.load(tile_row_start_ptr + i_m)
        row_end = tl.minimum(row_start + BLOCK_M, tl.load(expert_offsets_ptr + i_e + 1))
        w_address = tl.load(w_addresses_ptr + i_e)
        p_w_e = tl.multiple_of(w_address.to(tl.pointer_type(dtype)), W_ALIGN)
        stride_w_k = tl.multiple_of(tl.load(w_leading_strides_ptr + i_e), W_ALIGN // 2)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if W_TMA:
            w_desc = tl.make_tensor_descriptor(p_w_e, [K, N], [stride_w_k, 1], [BLOCK_K, BLOCK_N])
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_tiles):
            b_x = x_desc.load([row_start, ki * BLOCK_K])
            if W_TMA:
                b_w = w_desc.load([ki * BLOCK_K, i_n * BLOCK_N])
            else:
                b_w = tl.load(p_w_e + (ki * BLOCK_K + o_k)[:, None] * stride_w_k + (o_n % N)[None, :])
            acc = tl.dot(b_x, b_w, acc)
        o_r = row_start + tl.arange(0, BLOCK_M)
        m_r = o_r < row_end
        o_r = tl.where(m_r, o_r, row_start)
        o_pair = tl.load(sorted_to_pair_ptr + o_r)
        acc = acc * tl.load(row_scale_ptr + o_pair)[:, None]
        p_out = out_ptr + o_pair[:, None].to(tl.int64) * stride_out_m + o_n[None, :]
        tl.store(p_out, acc.to(dtype), mask=m_r[:, None] & (o_n < N)[None, :])


def gate_up_variants(shape, x, weights, plan, config: GroupedMatmulConfig):
    """``{name: (flops_N, run)}``: each ``run()`` returns the SwiGLU hidden ``[P, D]`` (or the
    ``[P, 2D]`` pre-activation for ``plain_2d``/``cublas``) in sorted order."""
    D, P = shape.D, plan.num_pairs
    tiled = plan.with_block_m(config.block_m)
    table = WeightTable.from_stacked(weights.gate_up, swiglu=True)
    x_sorted = x[(plan.sorted_to_pair // plan.top_k).long()]
    hidden = torch.empty(P, D, device=x.device, dtype=x.dtype)
    pre = torch.empty(P, 2 * D, device=x.device, dtype=x.dtype)
    plain = GroupedMatmulConfig(config.block_m, 256, config.block_k, config.group_m, 8, 3)
    dense_w = weights.gate_up[0]

    def one_dot(interleave: bool):
        grid = (tiled.max_tiles * triton.cdiv(D, config.block_n),)

        def run():
            _swiglu_one_dot_kernel[grid](
                x, table.addresses[0], table.addresses[1], table.leading_strides, hidden, tiled.sorted_to_pair,
                tiled.expert_offsets, tiled.tile_expert, tiled.tile_row_start, tiled.num_tiles, D, shape.H,
                tiled.max_tiles, tiled.top_k, x.stride(0), hidden.stride(0), interleave, table.align,
                config.block_m, config.block_n, config.block_k, config.group_m,
                num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip
            return hidden

        return run

    return {
        "library": lambda: grouped_matmul(x, weights.gate_up, tiled, gather=True, swiglu=True, config=config,
                                          out=hidden),
        "library_sorted": lambda: grouped_matmul(x_sorted, weights.gate_up, tiled, swiglu=True, config=config,
                                                 out=hidden),
        "plain_2d": lambda: grouped_matmul(x, weights.gate_up, tiled.with_block_m(plain.block_m), gather=True,
                                           config=plain, out=pre),
        "one_dot_concat": one_dot(False),
        "one_dot_inter8": one_dot(True),
        "cublas": lambda: torch.mm(x_sorted, dense_w, out=pre),
        "gather_rows": lambda: torch.index_select(x, 0, (plan.sorted_to_pair // plan.top_k).long(), out=x_sorted),
    }  # fmt: skip


def down_variants(shape, hidden, weights, plan, expert_weights, config: GroupedMatmulConfig):
    H, P = shape.H, plan.num_pairs
    tiled = plan.with_block_m(config.block_m)
    table = WeightTable.from_stacked(weights.down)
    scale = pair_weights(expert_weights, shape.S).view(-1)
    out = torch.empty(P, H, device=hidden.device, dtype=hidden.dtype)
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 4
    x_desc = TensorDescriptor(hidden, list(hidden.shape), list(hidden.stride()), [config.block_m, config.block_k])
    dense_w = weights.down[0]

    def persistent(w_tma: bool):
        def run():
            _persistent_down_kernel[(sms,)](
                x_desc, table.addresses[0], table.leading_strides, out, scale, tiled.sorted_to_pair,
                tiled.expert_offsets, tiled.tile_expert, tiled.tile_row_start, tiled.num_tiles, H, shape.D,
                out.stride(0), w_tma, sms, table.align, config.block_m, config.block_n, config.block_k,
                config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip
            return out

        return run

    return {
        "library": lambda: grouped_matmul(hidden, weights.down, tiled, row_scale=scale, scatter=True, config=config,
                                          out=out),
        "library_plain": lambda: grouped_matmul(hidden, weights.down, tiled, config=config, out=out),
        "persistent": persistent(False),
        "persistent_wtma": persistent(True),
        "cublas": lambda: torch.mm(hidden, dense_w, out=out),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--shapes", default="competition-1,mixtral-8x7b-prefill,qwen3-30b-a3b-prefill")
    args = parser.parse_args()
    picked = pick_device(False)
    if picked is None:
        return 2
    device, gpu = picked
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    wanted = args.shapes.split(",")
    rows = []
    for shape in load_shapes(False):
        if not any(shape.name.startswith(w) for w in wanted):
            continue
        x, weights, expert_ids, expert_weights = make_inputs(shape, device)
        rows_per_expert = -(-shape.T * (shape.k + shape.S) // (shape.E + shape.S))
        plan, gemms = forward_gemms(shape, x, weights, expert_ids, expert_weights)
        for gemm in ("gate_up", "down"):
            swiglu, N, K, flops, _ = gemms[gemm]
            config = heuristic_config(rows_per_expert, N, K, shape.dtype, swiglu=swiglu)
            if gemm == "gate_up":
                variants = gate_up_variants(shape, x, weights, plan, config)
                reference = variants["library"]().clone()
            else:
                hidden = reference_hidden
                variants = down_variants(shape, hidden, weights, plan, expert_weights, config)
                reference = variants["library"]().clone()
            times: dict[str, list[float]] = {name: [] for name in variants}
            errors: dict[str, float | str] = {}
            for name, run in variants.items():
                try:
                    result = run()
                    torch.cuda.synchronize()
                    if name in ("library", "library_sorted", "one_dot_concat", "one_dot_inter8", "persistent",
                                "persistent_wtma"):  # fmt: skip
                        result = result.clone()
                        errors[name] = rel_l2(result, reference)
                except Exception as error:  # noqa: BLE001 - a probe reports what fails to compile
                    errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    times.pop(name)
            for _ in range(ROUNDS):
                for name in times:
                    times[name].append(time_ms(variants[name], quick=True))
            for name, series in times.items():
                ms = statistics.median(series)
                n_flops = 0 if name == "gather_rows" else flops
                rows.append({"shape": shape.name, "gemm": gemm, "variant": name, "ms": ms, "all_ms": series,
                             "tflops": n_flops / ms / 1e9, "rel_l2_vs_library": errors.get(name)})  # fmt: skip
                print(f"{shape.name:30s} {gemm:8s} {name:16s} {ms:7.3f} ms {n_flops / ms / 1e9:6.0f} TFLOP/s "
                      f"err {errors.get(name)}", flush=True)  # fmt: skip
            for name, error in errors.items():
                if isinstance(error, str):
                    rows.append({"shape": shape.name, "gemm": gemm, "variant": name, "error": error})
                    print(f"{shape.name:30s} {gemm:8s} {name:16s} {error}", flush=True)
            if gemm == "gate_up":
                reference_hidden = reference
            del variants
        del x, weights, gemms, plan
        torch.cuda.empty_cache()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"GEMM gap probe on {gpu}, {date}, commit {git_commit()}: median of {ROUNDS} interleaved rounds",
             "", "| shape | GEMM | variant | ms | TFLOP/s | rel-L2 vs library |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['gemm']} | {row['variant']} | {row['error']} | | |")
        else:
            err = row["rel_l2_vs_library"]
            lines.append(f"| {row['shape']} | {row['gemm']} | {row['variant']} | {row['ms']:.3f} | {row['tflops']:.0f} | "
                         f"{'' if err is None else f'{err:.1e}'} |")  # fmt: skip
    write_report(report_path(args.out, "gemm_gap_probe_gpu.json"), {"gpu": gpu, "date": date,
                 "git_commit": git_commit(), "rows": rows}, "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
