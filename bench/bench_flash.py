"""GPU benchmark: attncc's flash kernels against the anchors of ../shared/ANCHORS.md.

B=1, H=16, D=128, bf16, causal, N in {2048, 8192, 32768}:
- sparse sliding_window(1024), sliding_window(1024) + 4 sinks and power(b=256, w=5) against
  FlexAttention (torch.compile'd) with the same mask_mod (create_block_mask, 128-token blocks);
- dense causal against SDPA (cuDNN if it runs here, else flash).

"fwd" is the training forward (inputs require grad), "fwd+bwd" the forward plus the backward with a
fixed dO. Medians of triton.testing.do_bench. Each pair is checked first: max abs error of the output
and of dq, dk, dv against the anchor. The markdown table is printed last and written to
``$OUT/bench_flash.md`` if OUT is set, else ``bench/results_flash.md``.

    python bench/bench_flash.py [--sizes 2048 8192 32768] [--sweep]

``--sweep`` also times a few tile configs (ATTNCC_FLASH_CONFIG) at N=8192 before the main table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys

import torch
import triton
from torch.nn.attention import sdpa_kernel

import anchors
from anchors import bench, block_mask, sdpa_backend

try:
    from attncc.codegen.variants.softmax import route
    from attncc.codegen.variants.softmax.flash import flash_attention_bwd, flash_attention_fwd, flash_config
except ImportError:  # the package is not installed: import the module from the checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from codegen.variants.softmax import route
    from codegen.variants.softmax.flash import flash_attention_bwd, flash_attention_fwd, flash_config

B, H, D = 1, 16, 128
DTYPE = torch.bfloat16
SCALE = 1.0 / math.sqrt(D)


def sliding_window_mod(window, sinks):
    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))

    return sliding_window


def power_mod(block, window_blocks):
    def power(b, h, q_idx, kv_idx):
        d = q_idx // block - kv_idx // block
        return (kv_idx <= q_idx) & ((d < window_blocks) | ((d & (d - 1)) == 0) | (kv_idx < block))

    return power


CASES = [
    ("sliding_window(1024)", dict(pattern="sliding_window", window=1024, sinks=0), sliding_window_mod(1024, 0)),
    ("sliding_window(1024)+4 sinks", dict(pattern="sliding_window", window=1024, sinks=4),
     sliding_window_mod(1024, 4)),
    ("power(b=256,w=5)", dict(pattern="power", block=256, window_blocks=5), power_mod(256, 5)),
    ("dense causal", dict(pattern="dense"), None),
    ("dense causal, routed", dict(routed=True), None),  # what a softmax site runs (kernel: auto, route.py)
]

def attncc_fns(q, k, v, do, spec):
    if spec.get("routed"):  # the kernel a dense causal site chooses by measuring (fwd+bwd: q needs grad)
        choice = route.choose("auto", q, k, v, scale=SCALE, causal=True)
        print(f"routed: {choice.kernel} ({choice.note})", flush=True)

        def routed():
            return route.run(choice.kernel, q, k, v, scale=SCALE, causal=True)

        def routed_fwd_bwd():
            o = routed()
            return (o,) + torch.autograd.grad(o, (q, k, v), do)

        return routed, routed_fwd_bwd
    kwargs = dict(scale=SCALE, causal=True, **spec)

    def fwd():
        return flash_attention_fwd(q, k, v, **kwargs)

    def fwd_bwd():
        o, lse = flash_attention_fwd(q, k, v, **kwargs)
        return (o,) + flash_attention_bwd(do, q, k, v, o, lse, **kwargs)

    return fwd, fwd_bwd


def anchor_forward(mask_mod, n, backend):
    """The anchor as f(q, k, v): FlexAttention with mask_mod's block mask, or SDPA causal."""
    if mask_mod is None:
        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)

        return sdpa
    mask = block_mask(mask_mod, n)

    def flex(q, k, v):
        return anchors.flex(q, k, v, block_mask=mask, scale=SCALE)

    return flex


def max_errors(ours_fwd_bwd, anchor, q, k, v, do):
    """Max abs error of out, dq, dk, dv: attncc against the anchor on the same inputs."""
    o, dq, dk, dv = ours_fwd_bwd()
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o_ref = anchor(*leaves)
    o_ref.backward(do)
    pairs = [(o, o_ref)] + list(zip((dq, dk, dv), (x.grad for x in leaves)))
    return [(a.float() - b.float()).abs().max().item() for a, b in pairs]


def run_case(name, spec, mask_mod, n, backend, backend_name):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g)
    ours_fwd, ours_fwd_bwd = attncc_fns(q, k, v, do, spec)
    anchor = anchor_forward(mask_mod, n, backend)

    def anchor_fwd():
        return anchor(q, k, v)

    def anchor_fwd_bwd():
        anchor(q, k, v).backward(do)

    errors = max_errors(ours_fwd_bwd, anchor, q, k, v, do)
    row = {
        "case": name, "N": n, "anchor": backend_name if mask_mod is None else "Flex",
        "ours_fwd": bench(ours_fwd, [q, k, v]), "anchor_fwd": bench(anchor_fwd, [q, k, v]),
        "ours_fwd_bwd": bench(ours_fwd_bwd, [q, k, v]), "anchor_fwd_bwd": bench(anchor_fwd_bwd, [q, k, v]),
        "max_err": max(errors),
    }
    print(f"{name} N={n}: max abs err out/dq/dk/dv = " + " / ".join(f"{e:.3g}" for e in errors)
          + f"; ms ours {row['ours_fwd']:.3f} / {row['ours_fwd_bwd']:.3f}, anchor {row['anchor_fwd']:.3f} / "
          f"{row['anchor_fwd_bwd']:.3f}", flush=True)
    return row


SWEEP = {
    # head dim: (forward configs, backward configs); see FlashConfig for the fields
    # D=128 backward: the shipped one, then the two ptxas finds spill-free on sm_90 (bench/ptxas_report.py)
    128: ([(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 128, 4, 3)],
          [(32, 64, 64, 32, 4, 3), (32, 32, 32, 32, 4, 3), (64, 32, 32, 64, 8, 3), (64, 128, 128, 64, 8, 2)]),
    64: ([(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
         [(64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 4, 3)]),
}


def sweep(n=8192):
    """Time the SWEEP tile configs on sliding_window(1024)+4 sinks at N=n, forward and backward apart."""
    kwargs = dict(scale=SCALE, causal=True, pattern="sliding_window", window=1024, sinks=4)
    for head_dim, (fwd_configs, bwd_configs) in SWEEP.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, H, n, head_dim, device="cuda", dtype=DTYPE, generator=g) for _ in range(4))
        o, lse = flash_attention_fwd(q, k, v, **kwargs)
        for part, configs in (("fwd", fwd_configs), ("bwd", bwd_configs)):
            for cfg in configs:
                default = dataclasses.astuple(flash_config(head_dim))
                full = list(cfg) + list(default[4:]) if part == "fwd" else list(default[:4]) + list(cfg)
                os.environ["ATTNCC_FLASH_CONFIG"] = json.dumps(full)
                try:
                    if part == "fwd":
                        ms = bench(lambda: flash_attention_fwd(q, k, v, **kwargs), None)
                    else:
                        ms = bench(lambda: flash_attention_bwd(do, q, k, v, o, lse, **kwargs), None)
                    print(f"sweep D={head_dim} N={n} {part} {cfg}: {ms:.3f} ms", flush=True)
                except Exception as e:  # a config that does not compile (shared memory) is reported
                    print(f"sweep D={head_dim} N={n} {part} {cfg}: failed {type(e).__name__}: {str(e)[:200]}",
                          flush=True)
                finally:
                    os.environ.pop("ATTNCC_FLASH_CONFIG")


def table(rows, header):
    lines = header + [
        "",
        "| case | N | anchor | attncc fwd ms | anchor fwd ms | fwd ratio | attncc fwd+bwd ms | "
        "anchor fwd+bwd ms | fwd+bwd ratio | max abs err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['N']} | {r['anchor']} | {r['ours_fwd']:.3f} | {r['anchor_fwd']:.3f} | "
            f"{r['anchor_fwd'] / r['ours_fwd']:.2f}x | {r['ours_fwd_bwd']:.3f} | {r['anchor_fwd_bwd']:.3f} | "
            f"{r['anchor_fwd_bwd'] / r['ours_fwd_bwd']:.2f}x | {r['max_err']:.3g} |")
    lines.append("")
    lines.append("ratio = anchor ms / attncc ms (> 1: attncc is faster).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_flash.py needs a CUDA GPU")
    if args.sweep:
        sweep()
    backend, backend_name = sdpa_backend(D, DTYPE)
    backend_name = f"SDPA {backend_name}"
    rows = []
    for n in args.sizes:
        for name, spec, mask_mod in CASES:
            try:
                rows.append(run_case(name, spec, mask_mod, n, backend, backend_name))
            except Exception as e:  # keep the other rows; the failure is printed
                print(f"{name} N={n}: failed {type(e).__name__}: {str(e)[:500]}", flush=True)
            torch.cuda.empty_cache()
    header = [
        f"# attncc flash kernels vs anchors ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__})",
        "",
        f"B={B}, H={H}, D={D}, {str(DTYPE).removeprefix('torch.')}, causal; medians of triton.testing.do_bench.",
    ]
    text = table(rows, header)
    out_dir = os.environ.get("OUT")
    path = pathlib.Path(out_dir) / "bench_flash.md" if out_dir else pathlib.Path(__file__).with_name("results_flash.md")
    path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
