"""The attention kernels compile to Triton IR for a Hopper GPU, with every combination of flags the
launchers pass. The interpreter (test_attention.py) runs kernels as Python and accepts what the
compiler refuses (a constexpr passed inside a tuple stops compilation under Triton 3.6), so this
front end is run here, on the CPU, without a GPU: in a fresh process, since the kernels must be
defined with the interpreter off."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir
    from longctx.ops.attention.backward import _delta_kernel, _dkdv_kernel, _dq_convert_kernel, _dq_kernel
    from longctx.ops.attention.forward import _fwd_kernel

    POINTERS = {"CU_Q": "*i32", "CU_K": "*i32", "OFFSETS": "*i32", "LSE": "*fp32", "DELTA": "*fp32", "DQA": "*fp32"}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": 8})

    def to_ir(kernel, constexprs):
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.isupper():
                signature[name] = POINTERS.get(name, "*bf16")
            else:
                signature[name] = "fp32" if "scale" in name else "i32"
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)

    count = 0
    for causal, varlen, offsets in itertools.product((True, False), repeat=3):
        flags = dict(IS_CAUSAL=causal, IS_VARLEN=varlen, HAS_OFFSETS=offsets, BLOCK_M=64, BLOCK_N=128, BLOCK_D=128)
        to_ir(_fwd_kernel, flags)
        to_ir(_dq_kernel, flags)
        for dk, dv, atomic, tma in ((True, True, False, True), (True, True, True, True), (True, False, True, True),
                                    (False, True, False, True), (True, True, True, False)):
            to_ir(_dkdv_kernel, dict(flags, WITH_DK=dk, WITH_DV=dv, ATOMIC_DQ=atomic, TMA_REDUCE=tma))
            count += 1
        count += 2
    to_ir(_delta_kernel, dict(IS_VARLEN=True, BLOCK_M=64, BLOCK_D=128))
    to_ir(_dq_convert_kernel, dict(BLOCK_M=64, BLOCK_D=128))
    print("compiled", count + 2)
""")


def test_every_attention_kernel_variant_compiles_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled 58" in run.stdout
