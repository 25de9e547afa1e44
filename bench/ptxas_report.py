"""Registers and spills of attncc's Triton kernels on sm_90 (H100/H200), measured without a GPU.

Each kernel is compiled by Triton for the target `cuda:90` and its PTX assembled by the ptxas that ships with
Triton (`ptxas -v`), which reports registers per thread and bytes of spill stores / loads. A kernel that
spills keeps part of its tiles in local memory (L1/L2) instead of registers: the first thing to look at when
a kernel is slower than its anchor. Runs on the CPU machine (no GPU, no TRITON_INTERPRET).

    python bench/ptxas_report.py [--warps 4 8] [--kernels _grads_q _output ...]

Shapes: linear's kernels at D = Dv = 128, bf16, causal, chunks of 64, for identity features unnormalized and
elu1 normalized (the lightest and the heaviest specializations).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attncc.codegen.variants.linear import chunked  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
BF16 = "*bf16"


def signature(fn, pointer_types: dict[str, str], constants: dict) -> dict[str, str]:
    """Triton's signature of `fn`: pointers as given (else fp32), `eps` fp32, other arguments i32."""
    sig = {}
    for param in fn.params:
        if param.is_constexpr or param.name in constants:
            sig[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            sig[param.name] = pointer_types.get(param.name, "*fp32")
        else:
            sig[param.name] = "fp32" if param.name == "eps" else "i32"
    return sig


def registers(fn, pointer_types: dict[str, str], constants: dict, num_warps: int, num_stages: int = 3):
    """(registers per thread, spill store bytes, spill load bytes) of one specialization, from ptxas -v."""
    source = ASTSource(fn=fn, signature=signature(fn, pointer_types, constants), constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        result = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return regs, stores, loads


def linear_cases():
    """(kernel name, specialization, function, pointer types, constants) of the linear kernels."""
    common = dict(BT=chunked.CHUNK, PADDED=False, DECAY=False, PRECISION="tf32")
    for fmap, normalize, tag in ((2, False, "identity raw"), (0, True, "elu1 normalized")):
        f = dict(FMAP=fmap)
        yield "_states", tag, chunked._states, dict(k_ptr=BF16, v_ptr=BF16, s_ptr=BF16), \
            dict(common, BK=64, BV=32, STORE_CHUNKS=True, INITIAL=False, Z=normalize, **f)
        yield "_output", tag, chunked._output, dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, s_ptr=BF16, o_ptr=BF16), \
            dict(common, BK=128, BV=64, CAUSAL=True, NORMALIZE=normalize, Z=normalize, **f)
        yield "_dstates", tag, chunked._dstates, dict(q_ptr=BF16, g_ptr=BF16, ds_ptr=BF16), \
            dict(BT=chunked.CHUNK, DECAY=False, PRECISION="tf32", BK=64, BV=32, CAUSAL=True, Z=normalize, **f)
        grads = dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, s_ptr=BF16, ds_ptr=BF16, g_ptr=BF16, dq_ptr=BF16,
                     dk_ptr=BF16, dv_ptr=BF16)
        yield "_grads_q", tag, chunked._grads_q, grads, dict(common, BK=128, BV=128, CAUSAL=True, Z=normalize, **f)
        yield "_grads_k", tag, chunked._grads_k, grads, dict(common, BK=128, BV=128, CAUSAL=True, Z=normalize, **f)
        yield "_grads_v", tag, chunked._grads_v, grads, dict(common, BK=128, BV=128, CAUSAL=True, **f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--kernels", nargs="*", default=None)
    args = parser.parse_args()
    print("| kernel | specialization | warps | registers | spill stores / loads (bytes per thread) |")
    print("|---|---|---|---|---|")
    for name, tag, fn, pointers, constants in linear_cases():
        if args.kernels and name not in args.kernels:
            continue
        for warps in args.warps:
            regs, stores, loads = registers(fn, pointers, constants, warps)
            print(f"| {name} | {tag} | {warps} | {regs} | {stores} / {loads} |", flush=True)


if __name__ == "__main__":
    main()
