"""Registers and spills of attncc's Triton kernels on sm_90 (H100/H200), measured without a GPU.

Each kernel is compiled by Triton for the target `cuda:90` and its PTX assembled by the ptxas that ships with
Triton (`ptxas -v`, codegen/aot.py), which reports registers per thread and bytes of spill stores / loads. A kernel that
spills keeps part of its tiles in local memory (L1/L2) instead of registers: the first thing to look at when
a kernel is slower than its anchor. Runs on the CPU machine (no GPU, no TRITON_INTERPRET).

    python bench/ptxas_report.py [--family linear softplus flash] [--warps 4 8] [--kernels _grads_q _output ...]

Without --warps, each kernel compiles with its shipped config (what tests/test_gpu_compile.py checks).

Shapes: D = Dv = 128, bf16, causal. linear: chunks of 64, identity features unnormalized and elu1 normalized
(the lightest and the heaviest specializations). softplus: LSSA and LSSAR (p = 15), the shipped GPU tiles
(or ATTNCC_SOFTPLUS_CONFIG's). flash: dense causal, sliding window 1024 with and without 4 sinks, and
PowerAttention (256, 5), the shipped GPU tiles (or ATTNCC_FLASH_CONFIG's).
"""

from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)

from attncc.codegen.aot import registers  # noqa: E402
from attncc.codegen.variants.linear import chunked  # noqa: E402
from attncc.codegen.variants.softmax import flash  # noqa: E402
from attncc.codegen.variants.softplus import flash as softplus  # noqa: E402

BF16 = "*bf16"


def linear_cases(warps: list[int] | None):
    """(kernel name, specialization, function, pointer types, constants, warps, stages) of the linear kernels:
    each with the shipped config's warps and stages, or with every count of `warps`."""
    cfg = chunked.config()
    common = dict(BT=chunked.CHUNK, PADDED=False, DECAY=False, PRECISION="tf32")
    grads = dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, s_ptr=BF16, ds_ptr=BF16, g_ptr=BF16, dq_ptr=BF16,
                 dk_ptr=BF16, dv_ptr=BF16)
    for fmap, normalize, tag in ((2, False, "identity raw"), (0, True, "elu1 normalized")):
        f = dict(FMAP=fmap)
        states = dict(common, BK=cfg.states_bk, BV=cfg.states_bv, STORE_CHUNKS=True, INITIAL=False, **f)
        dstates = dict(BT=chunked.CHUNK, DECAY=False, PRECISION="tf32", BK=cfg.dstates_bk, BV=cfg.dstates_bv,
                       CAUSAL=True, **f)
        cases = [("_states", chunked._states, dict(k_ptr=BF16, v_ptr=BF16, s_ptr=BF16),
                  dict(states, S_PART=True, Z=False), cfg.states_warps, cfg.states_stages),
                 ("_output", chunked._output, dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, s_ptr=BF16, o_ptr=BF16),
                  dict(common, BK=128, BV=cfg.output_bv, CAUSAL=True, NORMALIZE=normalize, Z=normalize, **f),
                  cfg.output_warps, cfg.output_stages),
                 ("_dstates", chunked._dstates, dict(q_ptr=BF16, g_ptr=BF16, ds_ptr=BF16),
                  dict(dstates, G_PART=True, Z=False), cfg.dstates_warps, cfg.dstates_stages)]
        if normalize:
            cases += [("_states (z)", chunked._states, dict(k_ptr=BF16), dict(states, S_PART=False, Z=True),
                       cfg.states_warps, cfg.states_stages),
                      ("_dstates (dz)", chunked._dstates, dict(q_ptr=BF16), dict(dstates, G_PART=False, Z=True),
                       cfg.dstates_warps, cfg.dstates_stages)]
        cases += [("_grads_q", chunked._grads_q, grads, dict(common, BK=128, BV=128, CAUSAL=True, Z=normalize, **f),
                   cfg.grads_warps, cfg.grads_stages),
                  ("_grads_k", chunked._grads_k, grads, dict(common, BK=128, BV=128, CAUSAL=True, Z=normalize, **f),
                   cfg.grads_warps, cfg.grads_stages),
                  ("_grads_v", chunked._grads_v, grads, dict(common, BK=128, BV=128, CAUSAL=True, **f),
                   cfg.grads_warps, cfg.grads_stages)]
        for name, fn, pointers, constants, shipped_warps, stages in cases:
            for w in warps or [shipped_warps]:
                yield name, tag, fn, pointers, constants, w, stages


def softplus_cases():
    """The softplus kernels with the shipped GPU tiles, or ATTNCC_SOFTPLUS_CONFIG's (their warps, whatever
    --warps says)."""
    cfg = softplus.config()
    pointers = dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, o_ptr=BF16, do_ptr=BF16, out_ptr=BF16, dk_ptr=BF16,
                    dv_ptr=BF16, kp_ptr="*i8")
    for p, tag in ((0.0, "LSSA"), (15.0, "LSSAR p=15")):
        common = dict(BD=128, BDV=128, EVEN=True, CAUSAL=True, PADDED=False, PRECISION="tf32",
                      UNSHIFTED=softplus.UNSHIFTED_ROWS, REWEIGHT=softplus._reweight(p))
        yield "_fwd", tag, softplus._fwd, pointers, dict(common, BM=cfg.bm, BN=cfg.bn), cfg.num_warps, cfg.num_stages
        yield "_dq", tag, softplus._dq, pointers, dict(common, BM=cfg.bm2, BN=cfg.bn2, ROW_SUM=False), \
            cfg.bwd_num_warps, cfg.bwd_num_stages
        yield "_dkv", tag, softplus._dkv, pointers, dict(common, BM=cfg.bm1, BN=cfg.bn1), cfg.bwd_num_warps, \
            cfg.bwd_num_stages


def flash_cases():
    """The flash kernels (forward, backward) with the shipped GPU tiles of each pattern at D = 128."""
    pointers = {name: BF16 for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    pointers.update({name: "*i32" for name in ("FULL_CNT", "FULL_IDX", "PART_CNT", "PART_IDX", "Q_FULL_CNT",
                                                "Q_FULL_IDX", "Q_PART_CNT", "Q_PART_IDX", "KV_FULL_CNT",
                                                "KV_FULL_IDX", "KV_PART_CNT", "KV_PART_IDX")})
    pointers.update(LSE="*fp32", DELTA="*fp32", TILE_COUNT="*fp32", KPAD="*i8")
    for spec, tag in ((flash._pattern("dense", True, 0, 0, 1, 0), "dense causal"),
                      (flash._pattern("sliding_window", True, 1024, 0, 1, 0), "window 1024"),
                      (flash._pattern("sliding_window", True, 1024, 4, 1, 0), "window 1024 + 4 sinks"),
                      (flash._pattern("power", True, 0, 0, 256, 5), "power (256, 5)")):
        cfg = flash.flash_config(128, spec.name)
        common = dict(HEAD_DIM=128, PATTERN=spec.name, IS_CAUSAL=spec.causal, WINDOW=spec.window, SINKS=spec.sinks,
                      PBLOCK=spec.block, PWINDOW=spec.window_blocks, GROUP=1, HAS_PADDING=False, UPCAST=False,
                      DOT_PRECISION="tf32", COUNT_TILES=False)
        yield "flash_fwd_kernel", tag, flash.flash_fwd_kernel, pointers, \
            dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg.num_warps, cfg.num_stages
        yield "flash_bwd_kernel", tag, flash.flash_bwd_kernel, pointers, \
            dict(common, BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2), \
            cfg.bwd_num_warps, cfg.bwd_num_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["linear"], choices=["linear", "softplus", "flash"])
    parser.add_argument("--warps", type=int, nargs="+", default=None, help="linear: these warp counts")
    parser.add_argument("--kernels", nargs="*", default=None)
    args = parser.parse_args()
    print("| kernel | specialization | warps | registers | spill stores / loads (bytes per thread) |")
    print("|---|---|---|---|---|")
    cases = []
    if "linear" in args.family:
        cases += list(linear_cases(args.warps))
    if "softplus" in args.family:
        cases += list(softplus_cases())
    if "flash" in args.family:
        cases += list(flash_cases())
    for name, tag, fn, pointers, constants, warps, stages in cases:
        if args.kernels and name not in args.kernels:
            continue
        regs, stores, loads = registers(fn, pointers, constants, warps, stages)
        print(f"| {name} | {tag} | {warps} | {regs} | {stores} / {loads} |", flush=True)


if __name__ == "__main__":
    main()
