"""Compile every Triton kernel of model/fused_kernels.py, in each autotuning config, for an H100/H200
(sm_90) without a GPU: Triton's real code generation down to a cubin, which the interpreter skips.
Run as `python -m tests.model.hopper_codegen` with TRITON_INTERPRET unset (the interpreter replaces
the kernels); prints one JSON line per kernel variant with the global load/store widths of its PTX.
"""
from __future__ import annotations

import json
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from modernbert_train.model import fused_kernels

# What a launch on aligned tensors specialises (16-byte aligned pointers, ints divisible by 16:
# ModernBERT-base's 1152-wide GeGLU halves, a 96 x 1024-token chunk).
_DIVISIBLE_INTS = ("n_rows", "n_cols")


def variants():
    for dtype in ("bf16", "fp32"):
        ptr = f"*{dtype}"
        for kernel, args in ((fused_kernels._geglu_fwd, dict(h_ptr=ptr, out_ptr=ptr, n_rows="i32", n_cols="i32")),
                             (fused_kernels._geglu_bwd, dict(h_ptr=ptr, grad_ptr=ptr, dh_ptr=ptr, n_rows="i32",
                                                             n_cols="i32"))):
            for config in kernel.configs:
                yield dtype, kernel, args, dict(config.kwargs), config.num_warps
        rotary = dict(packed_ptr=ptr, cos_ptr="*fp32", sin_ptr="*fp32", q_ptr=ptr, k_ptr=ptr, v_ptr=ptr,
                      n_rows="i32", n_heads="i32")
        for backward in (False, True):
            for config in fused_kernels._rotary_qkv.configs:
                yield (dtype, fused_kernels._rotary_qkv, rotary,
                       dict(HEAD_DIM=64, HALF_BLOCK=32, BACKWARD=backward, **config.kwargs), config.num_warps)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET: it replaces the kernels"
    target = GPUTarget("cuda", 90, 32)
    for dtype, kernel, args, constants, num_warps in variants():
        fn = kernel.kernel  # the @triton.jit function under the autotuning wrapper
        index = fn.arg_names.index
        attrs = {(index(name),): [["tt.divisibility", 16]] for name, ty in args.items()
                 if ty.startswith("*") or name in _DIVISIBLE_INTS}
        source = ASTSource(fn=fn, signature={**args, **{name: "constexpr" for name in constants}},
                           constexprs={(index(name),): value for name, value in constants.items()}, attrs=attrs)
        compiled = triton.compile(source, target=target, options=dict(num_warps=num_warps))
        ptx = compiled.asm["ptx"]
        print(json.dumps(dict(kernel=fn.__name__, dtype=dtype, constants=constants, num_warps=num_warps,
                              cubin_bytes=len(compiled.asm["cubin"]),
                              loads=sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
                              stores=sorted(set(re.findall(r"st\.global[.\w]*", ptx))))))


if __name__ == "__main__":
    main()
