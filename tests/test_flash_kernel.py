"""Flash-attention kernels (codegen/triton/flash.py) against an independent naive reference.

CPU (Triton interpreter): outputs, lse and gradients against a float64 dense masked softmax whose
mask is built by python loops over (i, j), with key padding; outputs are NaN-poisoned (tests/conftest.py
patches the launchers' allocator) so an unwritten tile fails; tile counts as the kernels report them, against the allowed set. GPU (`-m gpu`): the same
patterns in bfloat16 at long sequences against torch SDPA in float32 with an explicit boolean mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from attncc.codegen import launch
from attncc.codegen.variants.softmax import flash
from attncc.codegen.variants.softmax.flash import (
    flash_attention_bwd,
    flash_attention_fwd,
    flash_config,
    supports,
    visited_tiles,
)
from reference_cases import assert_close_scaled, is_power_of_two_or_zero, make_key_padding

# The interpreter converts 1-element arrays to scalars in loop bounds; numpy<2.4 only warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def case(B, H, Hkv, T, D, pattern, *, causal=True, window=0, sinks=0, block=128, window_blocks=0,
         padding="none", dtype="fp32", layout="bhtd", Tk=None, marks=()):
    name = f"B{B}-H{H}-Hkv{Hkv}-T{T}" + (f"-Tk{Tk}" if Tk else "") + f"-D{D}-{pattern}"
    if pattern == "dense":
        name += "-causal" if causal else "-noncausal"
    elif pattern == "sliding_window":
        name += f"-w{window}-s{sinks}"
    else:
        name += f"-b{block}-wb{window_blocks}"
    name += ("" if padding == "none" else f"-pad_{padding}") + f"-{dtype}" + ("" if layout == "bhtd" else f"-{layout}")
    spec = dict(causal=causal, pattern=pattern, window=window, sinks=sinks, block=block, window_blocks=window_blocks)
    return pytest.param(B, H, Hkv, T, Tk or T, D, spec, padding, dtype, layout, id=name, marks=marks)


CPU_CASES = [
    case(1, 1, 1, 1, 16, "dense"),
    case(2, 2, 2, 63, 32, "dense"),
    case(1, 2, 1, 63, 32, "dense", padding="left"),
    case(1, 4, 2, 100, 16, "dense", causal=False, padding="left"),
    case(2, 4, 1, 130, 64, "dense", padding="right", dtype="fp16"),
    case(1, 2, 1, 63, 32, "dense", causal=False, dtype="fp16", layout="bthd"),
    case(1, 2, 1, 40, 32, "dense", causal=False, Tk=100),
    case(1, 1, 1, 1, 16, "sliding_window", window=16, sinks=3),
    case(1, 2, 1, 63, 32, "sliding_window", window=16, sinks=2),
    case(1, 4, 2, 130, 16, "sliding_window", window=16, sinks=0),
    case(2, 4, 1, 100, 32, "sliding_window", window=16, sinks=3, padding="left", dtype="fp16"),
    case(1, 2, 2, 130, 16, "sliding_window", window=7, sinks=20, layout="bthd"),
    case(1, 2, 1, 130, 32, "power", block=16, window_blocks=2),
    case(1, 4, 2, 100, 16, "power", block=16, window_blocks=0, padding="right", dtype="fp16"),
    case(1, 2, 2, 130, 16, "power", block=24, window_blocks=1, layout="bthd"),
    case(2, 2, 1, 63, 64, "power", block=8, window_blocks=3, padding="left"),
]

GPU_CASES = [
    case(2, 4, 2, 1000, 64, "dense", dtype="bf16"),
    case(1, 4, 4, 2048, 128, "dense", causal=False, padding="right", dtype="bf16"),
    case(1, 4, 1, 4097, 64, "dense", dtype="bf16", layout="bthd"),
    case(1, 4, 2, 8192, 128, "sliding_window", window=1024, sinks=4, dtype="bf16"),
    case(1, 2, 2, 4100, 64, "sliding_window", window=300, sinks=0, dtype="bf16"),
    case(2, 4, 2, 3000, 128, "sliding_window", window=512, sinks=130, padding="right", dtype="bf16"),
    case(1, 4, 2, 8192, 128, "power", block=256, window_blocks=5, dtype="bf16"),
    case(1, 2, 1, 5000, 64, "power", block=100, window_blocks=2, padding="right", dtype="bf16"),
]


def allowed(i, j, spec):
    """The allowed set, one (query i, key j) pair at a time (VARIANTS.md §1, §8.1, §8.2)."""
    if spec["pattern"] == "dense":
        return j <= i or not spec["causal"]
    if spec["pattern"] == "sliding_window":
        return j <= i and (i - j < spec["window"] or j < spec["sinks"])
    distance = i // spec["block"] - j // spec["block"]
    return j <= i and (distance < spec["window_blocks"] or is_power_of_two_or_zero(distance) or j < spec["block"])


def allowed_matrix(Tq, Tk, spec):
    return torch.tensor([[allowed(i, j, spec) for j in range(Tk)] for i in range(Tq)], dtype=torch.bool)


def make_inputs(B, H, Hkv, Tq, Tk, D, dtype, layout, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(heads, T):
        if layout == "bthd":
            return torch.randn(B, T, heads, D, generator=g, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, heads, T, D, generator=g, device=device).to(dtype)

    q, k, v = randn(H, Tq), randn(Hkv, Tk), randn(Hkv, Tk)
    do = torch.randn(B, H, Tq, D, generator=g, device=device).to(dtype)
    return q, k, v, do


def naive_attention(q, k, v, scale, mask):
    """Dense masked softmax in the inputs' dtype; a row with no allowed key gives 0 and lse -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = ((q @ k.mT) * scale).masked_fill(~mask, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    out = (weights / torch.where(total == 0, torch.ones_like(total), total)) @ v
    lse = (torch.log(total) + row_max).squeeze(-1)
    return out, lse


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,spec,padding,dtype,layout", CPU_CASES)
def test_flash_matches_naive(B, H, Hkv, Tq, Tk, D, spec, padding, dtype, layout):
    q, k, v, do = make_inputs(B, H, Hkv, Tq, Tk, D, DTYPES[dtype], layout)
    key_padding = make_key_padding(padding, B, Tk, divisor=5)
    scale = 1.0 / math.sqrt(D)

    o, lse = flash_attention_fwd(q, k, v, scale=scale, key_padding=key_padding, **spec)
    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, scale=scale, key_padding=key_padding, **spec)

    mask = allowed_matrix(Tq, Tk, spec)[None, None]
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :]
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    expected, expected_lse = naive_attention(*leaves, scale, mask)
    expected.backward(do.double())

    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous()
    assert dq.dtype == q.dtype and dk.shape == k.shape and dv.shape == v.shape
    tol = 1e-4 if dtype == "fp32" else 3e-3
    assert_close_scaled("out", o, expected, tol)
    torch.testing.assert_close(lse.double(), expected_lse.detach(), rtol=0, atol=1e-4)
    for name, actual, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        assert not actual.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert_close_scaled(name, actual, leaf.grad, tol)


def test_rows_without_keys_are_zero():
    """Left padding wider than the window: those rows output 0, lse -inf, and pass no gradient."""
    q, k, v, do = make_inputs(1, 2, 1, 50, 50, 16, torch.float32, "bhtd")
    key_padding = torch.ones(1, 50, dtype=torch.bool)
    key_padding[0, :30] = False
    spec = dict(causal=True, pattern="sliding_window", window=8, sinks=0)
    o, lse = flash_attention_fwd(q, k, v, scale=0.25, key_padding=key_padding, **spec)
    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, scale=0.25, key_padding=key_padding, **spec)
    assert torch.equal(o[:, :, :30], torch.zeros_like(o[:, :, :30]))
    assert torch.isneginf(lse[:, :, :30]).all() and torch.isfinite(lse[:, :, 30:]).all()
    assert torch.equal(dq[:, :, :30], torch.zeros_like(dq[:, :, :30]))
    assert torch.equal(dk[:, :, :30], torch.zeros_like(dk[:, :, :30]))
    assert not dq.isnan().any() and not dk.isnan().any() and not dv.isnan().any()


def test_kernel_buffers_start_as_nan():
    """tests/conftest.py patches launch.alloc (plain torch.empty in the library) to fill with NaN."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert launch.alloc((2, 3), dtype, "cpu").isnan().all()


def test_outputs_are_the_poisoned_buffers_and_fully_written(monkeypatch):
    """Every output of a real forward and backward is a buffer the (poisoned) allocator returned, not
    a copy, and the kernels overwrite all of its NaNs."""
    allocated = []
    poisoned = launch.alloc

    def recording(shape, dtype, device):
        buf = poisoned(shape, dtype, device)
        assert buf.isnan().all()
        allocated.append(buf.data_ptr())
        return buf

    monkeypatch.setattr(launch, "alloc", recording)
    q, k, v, do = make_inputs(1, 2, 1, 40, 40, 16, torch.float32, "bhtd")
    spec = dict(causal=True, pattern="sliding_window", window=8, sinks=2)
    o, lse = flash_attention_fwd(q, k, v, scale=0.25, **spec)
    grads = flash_attention_bwd(do, q, k, v, o, lse, scale=0.25, **spec)
    assert len(allocated) == 6  # o, lse, dq, dk, dv, delta
    for name, out in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads)):
        assert out.data_ptr() in allocated, f"{name} is not a poisoned buffer"
        assert not out.isnan().any(), f"{name} has unwritten (NaN) elements"


def test_a_skipped_tile_stays_nan(monkeypatch):
    """A forward launch that drops its last query tile leaves that tile NaN, which the checks above
    (isnan, assert_close) catch; the tiles it did run are finite."""
    real = flash.flash_fwd_kernel

    class DropLastQueryTile:
        def __getitem__(self, grid):
            return real[(grid[0], grid[1] - 1)]

    monkeypatch.setattr(flash, "flash_fwd_kernel", DropLastQueryTile())
    block_m = flash_config(16).block_m
    T = block_m + 8
    q, k, v, _ = make_inputs(1, 1, 1, T, T, 16, torch.float32, "bhtd")
    o, lse = flash_attention_fwd(q, k, v, scale=0.25, causal=True)
    assert o[:, :, block_m:].isnan().all() and lse[:, :, block_m:].isnan().all()
    assert not o[:, :, :block_m].isnan().any() and not lse[:, :, :block_m].isnan().any()


@pytest.mark.parametrize("head_dim", [8, 60, 96, 256])
def test_unsupported_head_dim_raises(head_dim):
    q = torch.randn(1, 1, 4, head_dim)
    ok, reason = supports(head_dim, torch.float32)
    assert not ok and f"head dim {head_dim}" in reason and "reference" in reason
    with pytest.raises(ValueError, match=f"head dim {head_dim}.*reference"):
        flash_attention_fwd(q, q, q, scale=1.0, causal=True)


def test_supports():
    assert supports(64, torch.bfloat16) == (True, "")
    assert not supports(64, torch.float64)[0]


@pytest.mark.parametrize("kwargs", [
    dict(pattern="dilated", causal=True),
    dict(pattern="sliding_window", causal=False, window=4),
    dict(pattern="sliding_window", causal=True, window=0),
    dict(pattern="power", causal=True, block=0),
], ids=["unknown-pattern", "sliding-noncausal", "sliding-window0", "power-block0"])
def test_bad_pattern_arguments_raise(kwargs):
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError):
        flash_attention_fwd(q, q, q, scale=1.0, **kwargs)


def tiles_with_allowed_pairs(mask, rows_per_tile, cols_per_tile):
    """Per row tile: how many column tiles hold at least one allowed pair."""
    Tq, Tk = mask.shape
    padded = torch.zeros(-(-Tq // rows_per_tile) * rows_per_tile, -(-Tk // cols_per_tile) * cols_per_tile,
                         dtype=torch.bool)
    padded[:Tq, :Tk] = mask
    tiles = padded.view(padded.shape[0] // rows_per_tile, rows_per_tile, -1, cols_per_tile).any(3).any(1)
    return tiles.sum(1).to(torch.int32)


TILE_SPECS = [
    pytest.param(dict(pattern="dense", causal=True), id="dense-causal"),
    pytest.param(dict(pattern="dense", causal=False), id="dense-noncausal"),
    pytest.param(dict(pattern="sliding_window", causal=True, window=16, sinks=0), id="sliding_window-w16-s0"),
    pytest.param(dict(pattern="sliding_window", causal=True, window=16, sinks=3), id="sliding_window-w16-s3"),
    pytest.param(dict(pattern="sliding_window", causal=True, window=5, sinks=40), id="sliding_window-w5-s40"),
    pytest.param(dict(pattern="power", causal=True, block=16, window_blocks=2), id="power-b16-wb2"),
    pytest.param(dict(pattern="power", causal=True, block=24, window_blocks=1), id="power-b24-wb1"),
]


@pytest.mark.parametrize("spec", TILE_SPECS)
def test_visited_tiles_are_the_tiles_with_allowed_pairs(spec):
    """The kernels' own tile counts equal the number of tiles that hold an allowed pair."""
    T = 200
    cfg = flash_config(16)
    counts = visited_tiles(T, **spec)
    mask = allowed_matrix(T, T, {"window": 0, "sinks": 0, "block": 1, "window_blocks": 0, **spec})
    assert torch.equal(counts["fwd"], tiles_with_allowed_pairs(mask, cfg.block_m, cfg.block_n))
    assert torch.equal(counts["dq"], tiles_with_allowed_pairs(mask, cfg.block_m2, cfg.block_n2))
    assert torch.equal(counts["dkdv"], tiles_with_allowed_pairs(mask.T, cfg.block_n1, cfg.block_m1))
    if spec["pattern"] != "dense":
        dense = visited_tiles(T, pattern="dense", causal=True)
        assert counts["fwd"].sum() < dense["fwd"].sum() and counts["dkdv"].sum() < dense["dkdv"].sum()


def test_sliding_window_work_grows_linearly():
    """window=64: doubling N doubles the tiles visited (dense causal would quadruple them)."""
    cfg = flash_config(16)
    totals = {}
    for n in (512, 1024):
        counts = visited_tiles(n, pattern="sliding_window", causal=True, window=64, sinks=4)
        totals[n] = {name: int(c.sum()) for name, c in counts.items()}
    per_query_tile = -(-(64 + cfg.block_m) // cfg.block_n) + 2  # window span, diagonal, sink tile
    assert totals[1024]["fwd"] <= (1024 // cfg.block_m) * per_query_tile
    for name in ("fwd", "dkdv", "dq"):
        assert totals[1024][name] / totals[512][name] < 2.2, (name, totals)
    n_q = 1024 // cfg.block_m
    dense_causal = sum(min((m + 1) * cfg.block_m // cfg.block_n, 1024 // cfg.block_n) for m in range(n_q))
    assert totals[1024]["fwd"] * 4 < dense_causal




def sdpa_reference(q, k, v, do, scale, mask):
    """SDPA with a boolean mask on copies of the inputs in q's dtype: (out, dq, dk, dv)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    group = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        leaves[0], leaves[1].repeat_interleave(group, 1), leaves[2].repeat_interleave(group, 1),
        attn_mask=mask, scale=scale)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def gpu_mask(Tq, Tk, spec, key_padding, device):
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    if spec["pattern"] == "dense":
        mask = (j <= i) if spec["causal"] else torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    elif spec["pattern"] == "sliding_window":
        mask = (j <= i) & ((i - j < spec["window"]) | (j < spec["sinks"]))
    else:
        d = i // spec["block"] - j // spec["block"]
        mask = (j <= i) & ((d < spec["window_blocks"]) | ((d & (d - 1)) == 0) | (j < spec["block"]))
    mask = mask[None, None]
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :]
    return mask


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,spec,padding,dtype,layout", GPU_CASES)
def test_flash_matches_sdpa_gpu(B, H, Hkv, Tq, Tk, D, spec, padding, dtype, layout):
    device = "cuda"
    q, k, v, do = make_inputs(B, H, Hkv, Tq, Tk, D, DTYPES[dtype], layout, device=device)
    key_padding = make_key_padding(padding, B, Tk, divisor=5)
    key_padding = None if key_padding is None else key_padding.to(device)
    scale = 1.0 / math.sqrt(D)

    o, lse = flash_attention_fwd(q, k, v, scale=scale, key_padding=key_padding, **spec)
    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, scale=scale, key_padding=key_padding, **spec)
    again = flash_attention_bwd(do, q, k, v, o, lse, scale=scale, key_padding=key_padding, **spec)
    torch.cuda.synchronize()
    # no atomics in the backward: the same inputs give the same bits (the softplus kernels' dk did not, with
    # some tiles, on the H200)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), again)), "the backward differs between two calls"

    mask = gpu_mask(Tq, Tk, spec, key_padding, device)
    exact = sdpa_reference(q.float(), k.float(), v.float(), do.float(), scale, mask)
    torch_bf16 = sdpa_reference(q, k, v, do, scale, mask)
    for name, ours, want, theirs in zip(("out", "dq", "dk", "dv"), (o, dq, dk, dv), exact, torch_bf16):
        assert not ours.isnan().any(), f"{name} has NaN"
        err = (ours.float() - want).abs().max().item()
        torch_err = (theirs.float() - want).abs().max().item()
        bound = max(3 * torch_err, 1e-2 * want.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (torch {dtype} SDPA: {torch_err:.3g})"
