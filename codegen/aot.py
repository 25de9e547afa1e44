"""Compile a Triton kernel for an NVIDIA GPU on a machine without one, and read ptxas's register report.

The Triton interpreter (the CPU tests) runs a kernel's Python semantics, not its GPU compilation: an error
that only the GPU compiler raises (a constexpr branch with inconsistent return types, a layout it cannot
convert) and a kernel that spills registers stay invisible there. `compile_for` runs Triton's whole GPU
pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas to a cubin) for a target architecture without a GPU;
`registers` reads ptxas's `-v` report of the result. Used by tests/test_gpu_compile.py and
bench/ptxas_report.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
SCALARS = ("eps", "P", "qk_scale", "sm_scale")  # float arguments; any other non-pointer argument is i32


def signature(fn, pointer_types: dict[str, str], constants: dict) -> dict[str, str]:
    """Triton's signature of `fn`: constants as constexpr, pointers as given (else, named *_ptr, fp32),
    SCALARS fp32, anything else i32."""
    sig = {}
    for param in fn.params:
        if param.is_constexpr or param.name in constants:
            sig[param.name] = "constexpr"
        elif param.name in pointer_types:
            sig[param.name] = pointer_types[param.name]
        elif param.name.endswith("_ptr"):
            sig[param.name] = "*fp32"
        else:
            sig[param.name] = "fp32" if param.name in SCALARS else "i32"
    return sig


def compile_for(fn, pointer_types: dict[str, str], constants: dict, num_warps: int, num_stages: int = 3,
                arch: int = 90):
    """The compiled kernel (Triton's CompiledKernel: .asm holds ttir, ttgir, llir, ptx, cubin)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot.compile_for compiles for the GPU: unset TRITON_INTERPRET")
    source = ASTSource(fn=fn, signature=signature(fn, pointer_types, constants), constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def registers(fn, pointer_types: dict[str, str], constants: dict, num_warps: int, num_stages: int = 3,
              arch: int = 90) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) of one specialization, from ptxas -v."""
    kernel = compile_for(fn, pointer_types, constants, num_warps, num_stages, arch)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        result = subprocess.run([PTXAS, "-v", "--gpu-name", f"sm_{arch}a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return regs, stores, loads
