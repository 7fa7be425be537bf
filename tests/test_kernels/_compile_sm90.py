"""Compile the Triton kernels for an H100/H200 (sm_90) without a GPU, as Triton would at the first launch.

The interpreter runs the kernels' Python, not Triton's compiler, so layout,
type and lowering errors only show when the kernels are compiled. Triton ships
``ptxas``, so the whole pipeline (TTIR → TTGIR → LLVM → PTX → cubin) runs on a
CPU. Run in a fresh process with ``TRITON_INTERPRET=0``; prints one JSON line
per compiled specialization (registers and spill stack from ``cuobjdump``).

    TRITON_INTERPRET=0 python -m tests.test_kernels._compile_sm90
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from compressor.kernels.triton import float_kernels, hadamard, kernels

INTS = ["M", "N", "K", "W_WORDS", "Z_WORDS", "M_BUCKET", "stride_xm", "stride_xk", "stride_wn", "stride_ww",
        "stride_sn", "stride_sg", "stride_zw", "stride_zg", "stride_om", "stride_on"]
# (bits, group width, one group, g_idx, zero-point mode, bias, activation dtype, scale dtype)
CASES = [
    (4, 128, False, False, 1, False, "fp16", "fp16"),  # the W4 g128 asymmetric headline
    (3, 4096, True, False, 0, True, "bf16", "bf16"),  # straddling codes, per-channel, symmetric, bias
    (2, 64, False, True, 1, False, "fp16", "fp16"),  # g_idx: per-element scales
    (8, 32, False, False, 2, False, "fp32", "fp16"),  # float zero point, fp32 dot, groups narrower than the tile
]


def resources(compiled) -> dict:
    """Registers, spill stack and static shared memory of a compiled kernel, from its cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return {"registers": int(m[1]), "stack": int(m[2])} if m else {}


def compile_one(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int = 2):
    """Compile ``fn`` for sm_90 with these pointer types and constexprs (every integer argument i32)."""
    signature = dict(pointers)
    signature.update({name: "i32" for name in INTS if name in fn.arg_names})
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                         "num_stages": num_stages})


def main() -> None:
    for bits, gw, one, gidx, zp, bias, xdt, sdt in CASES:
        common = {"BITS": bits, "GROUP_W": gw, "ONE_GROUP": one, "HAS_GIDX": gidx, "ZP_MODE": zp}
        ptrs = {"x_ptr": f"*{xdt}", "w_ptr": "*i32", "s_ptr": f"*{sdt}", "z_ptr": "*i32" if zp < 2 else f"*{sdt}",
                "g_ptr": "*i32", "b_ptr": f"*{xdt}"}
        runs = [
            ("decode_gemv", kernels.decode_kernel, dict(ptrs, out_ptr=f"*{xdt}", ws_ptr="*fp32", cnt_ptr="*i32"),
             dict(common, HAS_BIAS=bias, DOT_F32=xdt == "fp32", BLOCK_M=1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=4,
                  USE_DOT=False), 4),
            ("decode_dot", kernels.decode_kernel, dict(ptrs, out_ptr=f"*{xdt}", ws_ptr="*fp32", cnt_ptr="*i32"),
             dict(common, HAS_BIAS=bias, DOT_F32=xdt == "fp32", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4,
                  USE_DOT=True), 4),
            ("gemm", kernels.gemm_kernel, dict(ptrs, out_ptr=f"*{xdt}"),
             dict(common, HAS_BIAS=bias, DOT_F32=xdt == "fp32", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 4),
            ("dequant", kernels.dequant_kernel,
             {k: v for k, v in ptrs.items() if k not in ("x_ptr", "b_ptr")} | {"out_ptr": f"*{xdt}"},
             dict(common, BLOCK_N=64, BLOCK_K=128), 4),
        ]
        for name, fn, pointers, constexprs, warps in runs:
            compiled = compile_one(fn, pointers, constexprs, warps)
            print(json.dumps({"kernel": name, "bits": bits, "group_width": gw, "g_idx": gidx, "zp_mode": zp,
                              "dtype": xdt, "triton": triton.__version__, **resources(compiled)}), flush=True)


def main_hadamard() -> None:
    """The online Hadamard kernel at SmolLM2's and Llama-3-8B's sizes, fp16 in and out, bf16-split dots."""
    for n, block_r in ((576, 8), (1536, 4), (4096, 2), (14336, 1), (96, 64)):
        p1, p2, m = hadamard.plan(n)
        mp = max(16, 1 << (m - 1).bit_length()) if m > 1 else 1
        pointers = {"x_ptr": "*fp16", "out_ptr": "*fp16", "h1_ptr": "*fp32", "h2_ptr": "*fp32", "hm_ptr": "*fp32"}
        signature = dict(pointers, ROWS="i32", stride_x="i32", stride_o="i32", scale="fp32")
        constexprs = dict(P1=p1, P2=p2, M=m, MP=mp, BLOCK_R=block_r, SPLIT_BF16=True)
        signature.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=hadamard.hadamard_kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4 if p1 * p2 * mp <= 4096 else 8})
        print(json.dumps({"kernel": "hadamard", "n": n, "plan": [p1, p2, m], "triton": triton.__version__,
                          **resources(compiled)}), flush=True)


def main_float() -> None:
    """The float-format kernel: FP8 per channel, NVFP4 and MXFP4, fp16 and bf16 inputs."""
    # (format, group width, activation dtype, scale dtype, rows per scale row): FP8 per channel and in 128 x 128
    # blocks, NVFP4, MXFP4
    cases = [(float_kernels.FMT_FP8, 4096, "fp16", "fp16", 1), (float_kernels.FMT_FP8, 128, "bf16", "bf16", 128),
             (float_kernels.FMT_NVFP4, 16, "bf16", "u8", 1), (float_kernels.FMT_MXFP4, 32, "fp16", "u8", 1)]
    ints = ["M", "N", "K", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_sn", "stride_sg",
            "stride_om", "stride_on"]
    for fmt, gw, xdt, sdt, row_block in cases:
        signature = {"x_ptr": f"*{xdt}", "w_ptr": "*u8", "s_ptr": f"*{sdt}", "gs_ptr": "*fp32", "b_ptr": f"*{xdt}",
                     "out_ptr": f"*{xdt}", **{name: "i32" for name in ints}}
        block_k = next(b for b in (64, 32, 16) if gw % b == 0)  # as float_launch picks it
        constexprs = dict(FMT=fmt, GROUP_W=gw, HAS_BIAS=False, DOT_F32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k,
                          ROW_BLOCK=row_block)
        signature.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=float_kernels.float_gemm_kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
        print(json.dumps({"kernel": "float_gemm", "fmt": fmt, "row_block": row_block, "dtype": xdt,
                          "triton": triton.__version__,
                          **resources(compiled)}), flush=True)


if __name__ == "__main__":
    main()
    main_hadamard()
    main_float()
