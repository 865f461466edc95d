"""Probe: does Triton 3.6's warp specialization (``tl.range(..., warp_specialize=True)``) or a
persistent TMA main loop make a plain GEMM faster on Hopper than the pointer-based loop the
grouped matmul uses?

Dense ``C = A @ B`` (``A [M, K]``, ``B [K, N]`` row-major, as the experts' ``W[e]``) at the
competition's two GEMM shapes, fp16, against cuBLAS (``torch.matmul``). Each variant is
checked against cuBLAS before it is timed; a variant that fails to compile is reported.

    PYTHONPATH=src python3 benchmarks/ws_probe_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from _common import git_commit, pick_device, rel_l2, report_path, time_ms, write_report


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(i_m, i_n)`` of program ``pid`` in the grouped (L2-swizzled) order."""
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % group) % size, (pid % group) // size


@triton.jit
def _pointer_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    i_m, i_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    p_a = a_ptr + o_m[:, None].to(tl.int64) * K + o_k[None, :]
    p_b = b_ptr + o_k[:, None].to(tl.int64) * N + o_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(p_a), tl.load(p_b), acc)
        p_a += BLOCK_K
        p_b += BLOCK_K * N
    tl.store(c_ptr + o_m[:, None].to(tl.int64) * N + o_n[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _tma_kernel(a_desc, b_desc, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    i_m, i_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, warp_specialize=WS):
        acc = tl.dot(a_desc.load([i_m * BLOCK_M, k]), b_desc.load([k, i_n * BLOCK_N]), acc)
    c_desc.store([i_m * BLOCK_M, i_n * BLOCK_N], acc.to(c_desc.dtype))


@triton.jit
def _persistent_kernel(a_desc, b_desc, c_desc, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr,
                       FLATTEN: tl.constexpr):  # fmt: skip
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        i_m, i_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_tiles):
            acc = tl.dot(a_desc.load([i_m * BLOCK_M, ki * BLOCK_K]), b_desc.load([ki * BLOCK_K, i_n * BLOCK_N]), acc)
        c_desc.store([i_m * BLOCK_M, i_n * BLOCK_N], acc.to(c_desc.dtype))


def run_variant(name, a, b, config):
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk, warps, stages = config
    c = torch.full((M, N), float("nan"), device=a.device, dtype=a.dtype)
    grid_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
    b_desc = TensorDescriptor(b, list(b.shape), list(b.stride()), [bk, bn])
    c_desc = TensorDescriptor(c, list(c.shape), list(c.stride()), [bm, bn])
    if name == "pointer":
        def launch():
            _pointer_kernel[(grid_tiles,)](a, b, c, M, N, K, bm, bn, bk, 8, num_warps=warps, num_stages=stages)
    elif name in ("tma", "tma_ws"):
        def launch():
            _tma_kernel[(grid_tiles,)](a_desc, b_desc, c_desc, M, N, K, bm, bn, bk, 8, name == "tma_ws",
                                       num_warps=warps, num_stages=stages)  # fmt: skip
    else:
        ws = name.endswith("_ws")
        flatten = "flat" in name

        def launch():
            _persistent_kernel[(min(sms, grid_tiles),)](a_desc, b_desc, c_desc, M, N, K, sms, bm, bn, bk, 8, ws,
                                                         flatten, num_warps=warps, num_stages=stages)  # fmt: skip
    launch()
    torch.cuda.synchronize()
    return c, launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    picked = pick_device(False)
    if picked is None:
        return 2
    device, gpu = picked
    torch.manual_seed(0)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    shapes = [("gate_up-like", 10240, 4096, 7168), ("down-like", 10240, 7168, 2048)]
    variants = ["pointer", "tma", "tma_ws", "persistent", "persistent_ws", "persistent_flat", "persistent_flat_ws"]
    configs = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 4, 3)]
    rows = []
    for shape, M, N, K in shapes:
        a = torch.randn(M, K, device=device, dtype=torch.float16)
        b = torch.randn(K, N, device=device, dtype=torch.float16) / K**0.5
        ref = a @ b
        flops = 2 * M * N * K
        cublas_ms = time_ms(lambda: a @ b)
        rows.append({"shape": shape, "variant": "cublas", "config": None, "ms": cublas_ms,
                     "tflops": flops / cublas_ms / 1e9})  # fmt: skip
        print(f"{shape} cublas {cublas_ms:.3f} ms {flops / cublas_ms / 1e9:.0f} TFLOP/s", flush=True)
        for variant in variants:
            for config in configs:
                row = {"shape": shape, "variant": variant, "config": config}
                try:
                    c, launch = run_variant(variant, a, b, config)
                    row["rel_l2"] = rel_l2(c, ref)
                    row["ms"] = time_ms(launch)
                    row["tflops"] = flops / row["ms"] / 1e9
                    row["pct_cublas"] = 100 * cublas_ms / row["ms"]
                except Exception as error:  # compile failures are the finding
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                rows.append(row)
                summary = (f"{row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s ({row['pct_cublas']:.0f}% cuBLAS) "
                           f"rel-L2 {row['rel_l2']:.1e}") if "ms" in row else row["error"]  # fmt: skip
                print(f"{shape} {variant} {config}: {summary}", flush=True)
        del a, b, ref
        torch.cuda.empty_cache()
    table = ["| shape | variant | config (BM, BN, BK, warps, stages) | ms | TFLOP/s | % cuBLAS |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            table.append(f"| {r['shape']} | {r['variant']} | {r['config']} | {r['ms']:.3f} | {r['tflops']:.0f} "
                         f"| {r.get('pct_cublas', 100):.0f}% |")  # fmt: skip
        else:
            table.append(f"| {r['shape']} | {r['variant']} | {r['config']} | {r['error']} | | |")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_report(report_path(args.out, "ws_probe_gpu.json"),
                 {"gpu": gpu, "date": date, "git_commit": git_commit(), "rows": rows},
                 f"warp-specialization probe on {gpu}, {date}, commit {git_commit()}\n\n" + "\n".join(table) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
