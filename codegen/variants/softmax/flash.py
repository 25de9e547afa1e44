"""Flash-attention Triton kernels for ``softmax`` and ``sparse`` attention, forward and backward.

    o_i = Σ_{j∈A_i} softmax_{j∈A_i}(scale · q_i·k_j) v_j,   lse_i = log Σ_{j∈A_i} exp(scale · q_i·k_j)

with the allowed set A_i of one of three patterns (VARIANTS.md §1, §8.1, §8.2), intersected with the
key padding:

- ``dense``: every key, or j <= i when ``causal``;
- ``sliding_window`` (causal): j <= i and (i - j < window or j < sinks);
- ``power`` (causal): with Δ = i//block - j//block, j <= i and (Δ < window_blocks or Δ & (Δ-1) == 0
  or j < block).

Indices are top-left aligned (query i, key j), like SDPA's ``is_causal``. A query with no allowed key
outputs 0 and has lse = -inf; its gradients are 0.

Every program visits only the tiles that can hold an allowed pair, and applies the element mask only
on the tiles where some pair is not allowed ("partial" tiles; "full" tiles skip the mask math). For
``dense`` and ``sliding_window`` the visited tiles are a few runs of consecutive tiles computed in the
kernel from the tile's bounds; for ``power`` the host builds per-tile index lists (a block mask,
cached by shape). README.md beside this file derives the kernels and the tile enumeration.

Layout: q [B, H, Tq, D], k and v [B, Hkv, Tk, D] with any strides; query head h reads kv head
h // (H // Hkv). ``key_padding`` is bool [B, Tk], True = real token. Outputs are contiguous.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from attncc.codegen import launch

PATTERNS = ("dense", "sliding_window", "power")
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_INT32_MAX = 2**31 - 1




@triton.jit
def _allowed(rows, cols, Tk, PATTERN: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             SINKS: tl.constexpr, PBLOCK: tl.constexpr, PWINDOW: tl.constexpr):
    """Whether query ``rows`` may attend to key ``cols`` (the two broadcast against each other)."""
    ok = cols < Tk
    if PATTERN == "dense":
        if IS_CAUSAL:
            ok = ok & (cols <= rows)
    elif PATTERN == "sliding_window":
        ok = ok & (cols <= rows) & ((rows - cols < WINDOW) | (cols < SINKS))
    else:
        delta = rows // PBLOCK - cols // PBLOCK
        ok = ok & (cols <= rows) & ((delta < PWINDOW) | ((delta & (delta - 1)) == 0) | (cols < PBLOCK))
    return ok


@triton.jit
def _run_tile(t, s0, c0, s1, c1, s2):
    """The t-th tile of three consecutive runs of tiles [s0, s0+c0), [s1, s1+c1), [s2, ...)."""
    return tl.where(t < c0, s0 + t, tl.where(t < c0 + c1, s1 + t - c0, s2 + t - c0 - c1))


@triton.jit
def _kv_runs(m0, m1, Tk, PATTERN: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             SINKS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles that query rows [m0, m1] can see, as runs (start, count).

    Returns two runs of full tiles (every pair allowed, tile inside Tk) and three runs of partial
    tiles; together they are disjoint and hold every tile with an allowed pair.
    """
    zero = m0 * 0
    n_tiles = tl.cdiv(Tk, BLOCK_N) + zero
    n_whole = Tk // BLOCK_N + zero
    if PATTERN == "sliding_window":
        hi = tl.minimum(n_tiles, m1 // BLOCK_N + 1)
        lo = tl.minimum(tl.maximum(m0 - WINDOW + 1, 0) // BLOCK_N, hi)
        f_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(m1 - WINDOW + 1, 0), BLOCK_N), lo), hi)
        f_hi = tl.maximum(tl.minimum(tl.minimum((m0 + 1) // BLOCK_N, n_whole), hi), f_lo)
        s_hi = tl.minimum(tl.cdiv(SINKS, BLOCK_N) + zero, lo)
        s_full = tl.minimum(tl.minimum(SINKS // BLOCK_N + zero, n_whole), s_hi)
        return zero, s_full, f_lo, f_hi - f_lo, s_full, s_hi - s_full, lo, f_lo - lo, f_hi, hi - f_hi
    else:
        if IS_CAUSAL:
            hi = tl.minimum(n_tiles, m1 // BLOCK_N + 1)
            f_hi = tl.minimum(tl.minimum((m0 + 1) // BLOCK_N, n_whole), hi)
        else:
            hi = n_tiles
            f_hi = n_whole
        return zero, f_hi, zero, zero, f_hi, hi - f_hi, zero, zero, zero, zero


@triton.jit
def _q_runs(j0, j1, Tq, PATTERN: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
            SINKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query tiles that can see key columns [j0, j1], as runs (start, count).

    Returns one run of full tiles (every pair allowed, tile inside Tq) and two runs of partial
    tiles; together they are disjoint and hold every tile with an allowed pair.
    """
    zero = j0 * 0
    n_tiles = tl.cdiv(Tq, BLOCK_M) + zero
    n_whole = Tq // BLOCK_M + zero
    if PATTERN == "dense" and not IS_CAUSAL:
        return zero, n_whole, n_whole, n_tiles - n_whole, zero, zero
    lo = tl.minimum(j0 // BLOCK_M, n_tiles)
    if PATTERN == "sliding_window":
        hi = tl.where(j0 < SINKS, n_tiles, tl.minimum(n_tiles, (j1 + WINDOW - 1) // BLOCK_M + 1))
        hi = tl.maximum(hi, lo)
        f_hi = tl.where(j1 < SINKS, n_whole, tl.minimum(n_whole, (j0 + WINDOW) // BLOCK_M))
    else:
        hi = n_tiles
        f_hi = n_whole
    f_lo = tl.minimum(tl.maximum(tl.cdiv(j1, BLOCK_M), lo), hi)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    return f_lo, f_hi - f_lo, lo, f_lo - lo, f_hi, hi - f_hi


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, n, k_base, v_base, kpad_base, offs_m, offs_d, Tk, qk_scale,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
              MASKED: tl.constexpr, HAS_PADDING: tl.constexpr, PATTERN: tl.constexpr,
              IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, PBLOCK: tl.constexpr,
              PWINDOW: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One online-softmax step of a query tile over key tile ``n`` (scores in log2 units)."""
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [D, BN]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BN, D]
    if MASKED:
        kt = tl.load(kt_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
    if MASKED:
        ok = _allowed(offs_m[:, None], offs_n[None, :], Tk, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK, PWINDOW)
        if HAS_PADDING:
            kp = tl.load(kpad_base + offs_n * stride_pn, mask=offs_n < Tk, other=0)
            ok = ok & (kp != 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])  # [BM, BN]
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # [BM, D]
    return acc, m_new, l_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE, KPAD, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, TILE_COUNT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_pb, stride_pn, stride_full, stride_part,
    H, Tq, Tk, qk_scale,
    HEAD_DIM: tl.constexpr, PATTERN: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SINKS: tl.constexpr, PBLOCK: tl.constexpr, PWINDOW: tl.constexpr, GROUP: tl.constexpr,
    HAS_PADDING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """Grid (B*H, query tiles). One program: one query tile of one head, over its key tiles."""
    pid_bh = tl.program_id(0).to(tl.int64)
    m = tl.num_programs(1) - 1 - tl.program_id(1)  # last (heaviest) query tiles start first
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = m * BLOCK_M
    m1 = tl.minimum(m0 + BLOCK_M, Tq) - 1
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Tq, other=0.0)  # [BM, D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpad_base = KPAD + b * stride_pb

    if PATTERN == "power":
        n_full = tl.load(FULL_CNT + m)
        n_part = tl.load(PART_CNT + m)
    else:
        fs0, fc0, fs1, fc1, ps0, pc0, ps1, pc1, ps2, pc2 = _kv_runs(
            m0, m1, Tk, PATTERN, IS_CAUSAL, WINDOW, SINKS, BLOCK_N)
        n_full = fc0 + fc1
        n_part = pc0 + pc1 + pc2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for t in range(0, n_full):
        if PATTERN == "power":
            n = tl.load(FULL_IDX + m * stride_full + t)
        else:
            n = _run_tile(t, fs0, fc0, fs1, fc1, fs1)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, n, k_base, v_base, kpad_base, offs_m, offs_d, Tk,
                                  qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                                  HAS_PADDING, HAS_PADDING, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK,
                                  PWINDOW, BLOCK_N, UPCAST, DOT_PRECISION)
    for t in range(0, n_part):
        if PATTERN == "power":
            n = tl.load(PART_IDX + m * stride_part + t)
        else:
            n = _run_tile(t, ps0, pc0, ps1, pc1, ps2)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, n, k_base, v_base, kpad_base, offs_m, offs_d, Tk,
                                  qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                                  True, HAS_PADDING, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK,
                                  PWINDOW, BLOCK_N, UPCAST, DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=offs_m[:, None] < Tq)
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)
    if COUNT_TILES:
        tl.store(TILE_COUNT + pid_bh * tl.num_programs(1) + m, n_full + n_part)


@triton.jit
def flash_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) in float32. Grid (B*H, query tiles)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=rows, other=0.0)  # [BM, D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=rows, other=0.0)  # [BM, D]
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _dkdv_tile(dk, dv, k, v, m, q_base, do_base, lse_base, delta_base, offs_n, offs_d, kp_ok, Tq, Tk,
               qk_scale, stride_qm, stride_qd, stride_dom, stride_dod,
               MASKED: tl.constexpr, HAS_PADDING: tl.constexpr, PATTERN: tl.constexpr,
               IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, PBLOCK: tl.constexpr,
               PWINDOW: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Adds query tile ``m``'s contribution to a key tile's dK and dV (transposed scores [BN, BM])."""
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    qt_ptrs = q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd  # [D, BM]
    do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod  # [BM, D]
    if MASKED:
        rows = offs_m < Tq
        qt = tl.load(qt_ptrs, mask=rows[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rows, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
    else:
        qt = tl.load(qt_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    if UPCAST:
        qt = qt.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)  # an empty row passes nothing
    st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]
    pt = tl.exp2(st - lse2[None, :])
    if MASKED:
        ok = _allowed(offs_m[None, :], offs_n[:, None], Tk, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK, PWINDOW)
        if HAS_PADDING:
            ok = ok & kp_ok[:, None]
        pt = tl.where(ok, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # [BN, D]
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM]
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)  # [BN, D]
    return dk, dv


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, n, k_base, v_base, kpad_base, offs_m, offs_d, Tk, qk_scale,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
             MASKED: tl.constexpr, HAS_PADDING: tl.constexpr, PATTERN: tl.constexpr,
             IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, PBLOCK: tl.constexpr,
             PWINDOW: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """Adds key tile ``n``'s contribution to a query tile's dQ."""
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [D, BN]
    vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd  # [D, BN]
    if MASKED:
        kt = tl.load(kt_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
        vt = tl.load(vt_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        vt = tl.load(vt_ptrs)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        ok = _allowed(offs_m[:, None], offs_n[None, :], Tk, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK, PWINDOW)
        if HAS_PADDING:
            kp = tl.load(kpad_base + offs_n * stride_pn, mask=offs_n < Tk, other=0)
            ok = ok & (kp != 0)[None, :]
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, vt, input_precision=DOT_PRECISION)  # [BM, BN]
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)  # [BM, D]
    return dq


@triton.jit
def flash_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, KPAD,
    Q_FULL_CNT, Q_FULL_IDX, Q_PART_CNT, Q_PART_IDX,
    KV_FULL_CNT, KV_FULL_IDX, KV_PART_CNT, KV_PART_IDX,
    TILE_COUNT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_pb, stride_pn, stride_qfull, stride_qpart, stride_kvfull, stride_kvpart,
    H, Hkv, Tq, Tk, sm_scale, qk_scale, n_kv_tiles,
    HEAD_DIM: tl.constexpr, PATTERN: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SINKS: tl.constexpr, PBLOCK: tl.constexpr, PWINDOW: tl.constexpr, GROUP: tl.constexpr,
    HAS_PADDING: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    """Grid (B*Hkv, key tiles of BLOCK_N1 + query tiles of BLOCK_M2).

    The first programs each own one key tile of one kv head: dK and dV, summed over the GQA group,
    iterating the query tiles that can see the key tile (the transposed tile structure). The rest
    each own one query tile of the group's query heads: dQ, iterating key tiles as the forward does.
    Every output element is written by exactly one program; no atomics.
    """
    pid_bk = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    offs_d = tl.arange(0, HEAD_DIM)
    if pid_t < n_kv_tiles:
        n = pid_t
        j0 = n * BLOCK_N1
        j1 = tl.minimum(j0 + BLOCK_N1, Tk) - 1
        offs_n = j0 + tl.arange(0, BLOCK_N1)
        cols = offs_n[:, None] < Tk
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=cols, other=0.0)  # [BN1, D]
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=cols, other=0.0)  # [BN1, D]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_PADDING:
            kp_ok = tl.load(KPAD + b * stride_pb + offs_n * stride_pn, mask=offs_n < Tk, other=0) != 0
        else:
            kp_ok = offs_n < Tk
        if PATTERN == "power":
            n_full = tl.load(KV_FULL_CNT + n)
            n_part = tl.load(KV_PART_CNT + n)
        else:
            fs0, fc0, ps0, pc0, ps1, pc1 = _q_runs(j0, j1, Tq, PATTERN, IS_CAUSAL, WINDOW, SINKS, BLOCK_M1)
            n_full = fc0
            n_part = pc0 + pc1
        dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse_base = LSE + (b * H + h) * Tq
            delta_base = DELTA + (b * H + h) * Tq
            for t in range(0, n_full):
                if PATTERN == "power":
                    m = tl.load(KV_FULL_IDX + n * stride_kvfull + t)
                else:
                    m = fs0 + t
                dk, dv = _dkdv_tile(dk, dv, k, v, m, q_base, do_base, lse_base, delta_base, offs_n, offs_d,
                                    kp_ok, Tq, Tk, qk_scale, stride_qm, stride_qd, stride_dom, stride_dod,
                                    HAS_PADDING, HAS_PADDING, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK,
                                    PWINDOW, BLOCK_M1, UPCAST, DOT_PRECISION)
            for t in range(0, n_part):
                if PATTERN == "power":
                    m = tl.load(KV_PART_IDX + n * stride_kvpart + t)
                else:
                    m = _run_tile(t, ps0, pc0, ps1, pc1, ps1)
                dk, dv = _dkdv_tile(dk, dv, k, v, m, q_base, do_base, lse_base, delta_base, offs_n, offs_d,
                                    kp_ok, Tq, Tk, qk_scale, stride_qm, stride_qd, stride_dom, stride_dod,
                                    True, HAS_PADDING, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK,
                                    PWINDOW, BLOCK_M1, UPCAST, DOT_PRECISION)
        dk = dk * sm_scale
        tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=cols)
        tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=cols)
    else:
        m = tl.num_programs(1) - 1 - pid_t  # last (heaviest) query tiles start first
        m0 = m * BLOCK_M2
        m1 = tl.minimum(m0 + BLOCK_M2, Tq) - 1
        offs_m = m0 + tl.arange(0, BLOCK_M2)
        rows = offs_m < Tq
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        kpad_base = KPAD + b * stride_pb
        if PATTERN == "power":
            n_full = tl.load(Q_FULL_CNT + m)
            n_part = tl.load(Q_PART_CNT + m)
        else:
            fs0, fc0, fs1, fc1, ps0, pc0, ps1, pc1, ps2, pc2 = _kv_runs(
                m0, m1, Tk, PATTERN, IS_CAUSAL, WINDOW, SINKS, BLOCK_N2)
            n_full = fc0 + fc1
            n_part = pc0 + pc1 + pc2
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=rows[:, None], other=0.0)  # [BM2, D]
            do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                         + offs_d[None, :] * stride_dod, mask=rows[:, None], other=0.0)  # [BM2, D]
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + (b * H + h) * Tq + offs_m, mask=rows, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
            delta = tl.load(DELTA + (b * H + h) * Tq + offs_m, mask=rows, other=0.0)
            dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
            for t in range(0, n_full):
                if PATTERN == "power":
                    n = tl.load(Q_FULL_IDX + m * stride_qfull + t)
                else:
                    n = _run_tile(t, fs0, fc0, fs1, fc1, fs1)
                dq = _dq_tile(dq, q, do, lse2, delta, n, k_base, v_base, kpad_base, offs_m, offs_d, Tk, qk_scale,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                              HAS_PADDING, HAS_PADDING, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK, PWINDOW,
                              BLOCK_N2, UPCAST, DOT_PRECISION)
            for t in range(0, n_part):
                if PATTERN == "power":
                    n = tl.load(Q_PART_IDX + m * stride_qpart + t)
                else:
                    n = _run_tile(t, ps0, pc0, ps1, pc1, ps2)
                dq = _dq_tile(dq, q, do, lse2, delta, n, k_base, v_base, kpad_base, offs_m, offs_d, Tk, qk_scale,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                              True, HAS_PADDING, PATTERN, IS_CAUSAL, WINDOW, SINKS, PBLOCK, PWINDOW,
                              BLOCK_N2, UPCAST, DOT_PRECISION)
            dq = dq * sm_scale
            tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
                     dq.to(DQ.dtype.element_ty), mask=rows[:, None])
    if COUNT_TILES:
        tl.store(TILE_COUNT + pid_bk * tl.num_programs(1) + pid_t, n_full + n_part)




@dataclass(frozen=True)
class FlashConfig:
    """Tile shapes and launch parameters. Forward: BLOCK_M x BLOCK_N. Backward: dK/dV programs own
    BLOCK_N1 keys and step over BLOCK_M1 queries; dQ programs own BLOCK_M2 queries and step over
    BLOCK_N2 keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    bwd_num_warps: int
    bwd_num_stages: int


_INTERPRETER_CONFIG = FlashConfig(32, 16, 4, 1, 16, 32, 32, 16, 4, 1)
# Chosen on the H200 (README.md, "Configs"): per head dim, and per (head dim, pattern) where a
# pattern measured faster with another one.
_GPU_CONFIGS = {
    16: FlashConfig(128, 64, 4, 3, 64, 128, 128, 64, 4, 2),
    32: FlashConfig(128, 64, 4, 3, 64, 128, 128, 64, 4, 2),
    64: FlashConfig(128, 64, 4, 3, 64, 128, 128, 64, 8, 2),
    128: FlashConfig(64, 64, 4, 3, 32, 64, 64, 32, 4, 3),
    (128, "power"): FlashConfig(64, 64, 4, 3, 64, 128, 128, 64, 8, 2),
}



def flash_config(head_dim: int, pattern: str = "dense") -> FlashConfig:
    """The config for ``head_dim`` and ``pattern``: one fixed config under the interpreter, a small
    table on GPU.

    ``ATTNCC_FLASH_CONFIG`` (a JSON list of FlashConfig's ten fields) overrides it, for tuning.
    """
    return launch.tiles("ATTNCC_FLASH_CONFIG", FlashConfig, _INTERPRETER_CONFIG,
                        _GPU_CONFIGS.get((head_dim, pattern), _GPU_CONFIGS.get(head_dim)))


def supports(head_dim: int, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the flash kernels handle this head dim and dtype, and if not, why."""
    if not (16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0):
        return False, (f"flash kernel: head dim {head_dim} is not supported (needs a power of two in "
                       f"16..128); the reference implementation is used instead")
    if dtype not in DTYPES:
        return False, (f"flash kernel: dtype {dtype} is not supported (needs float16, bfloat16 or "
                       f"float32); the reference implementation is used instead")
    return True, ""


@dataclass(frozen=True)
class _Pattern:
    """The pattern constants as the kernels specialize on them (unused ones normalized)."""

    name: str
    causal: bool
    window: int = 0
    sinks: int = 0
    block: int = 1
    window_blocks: int = 0


def _pattern(pattern: str, causal: bool, window: int, sinks: int, block: int, window_blocks: int) -> _Pattern:
    if pattern == "dense":
        return _Pattern("dense", bool(causal))
    if pattern not in PATTERNS:
        raise ValueError(f"flash kernel: unknown pattern {pattern!r}; expected one of {list(PATTERNS)}")
    if not causal:
        raise ValueError(f"flash kernel: pattern {pattern!r} is causal; got causal=False")
    if pattern == "sliding_window":
        if window < 1 or sinks < 0:
            raise ValueError(f"flash kernel: sliding_window needs window >= 1 and sinks >= 0, got {window}, {sinks}")
        return _Pattern("sliding_window", True, window=int(window), sinks=int(sinks))
    if block < 1 or window_blocks < 0:
        raise ValueError(f"flash kernel: power needs block >= 1 and window_blocks >= 0, got {block}, {window_blocks}")
    return _Pattern("power", True, block=int(block), window_blocks=int(window_blocks))




def _next_pow2(x: np.ndarray) -> np.ndarray:
    """Smallest power of two >= x for x >= 1; 0 for 0."""
    v = x.astype(np.int64) - 1
    for shift in (1, 2, 4, 8, 16, 32):
        v |= v >> shift
    return np.where(x <= 0, 0, v + 1)


def _power_tile_classes(q_len, k_len, block_m, block_n, block, window_blocks):
    """For PowerAttention, per (query tile, key tile): does some pair attend, does every pair attend.

    Exact by interval reasoning on the block distance Δ = i//block - j//block, which over a tile
    pair takes every value in [Δmin, Δmax]: a tile is visited iff some causal pair may have
    j < block, Δ < window_blocks, or a power-of-two Δ in range (a superset of the allowed pairs);
    it is full only if every pair is causal and the whole Δ range is allowed.
    """
    m0 = np.arange(0, q_len, block_m, dtype=np.int64)[:, None]
    m1 = np.minimum(m0 + block_m, q_len) - 1
    j0 = np.arange(0, k_len, block_n, dtype=np.int64)[None, :]
    j1 = np.minimum(j0 + block_n, k_len) - 1
    d_min = m0 // block - j1 // block
    d_max = m1 // block - j0 // block
    lo = np.maximum(d_min, 0)
    some = (j0 <= m1) & ((j0 < block) | (lo < window_blocks) | (_next_pow2(lo) <= d_max))
    single_pow2 = (d_min == d_max) & ((d_min & (d_min - 1)) == 0)
    every = (j1 <= m0) & ((j1 < block) | (d_max < window_blocks) | single_pow2)
    return some, every, m0 + block_m <= q_len, j0 + block_n <= k_len


def _tile_lists(visit: np.ndarray, full: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """Row-compressed lists: (full count, full index, partial count, partial index) per row."""
    out = []
    for mask in (visit & full, visit & ~full):
        count = mask.sum(axis=1).astype(np.int32)
        width = max(int(count.max(initial=0)), 1)
        index = np.argsort(~mask, axis=1, kind="stable")[:, :width].astype(np.int32)
        out += [torch.from_numpy(count).to(device), torch.from_numpy(np.ascontiguousarray(index)).to(device)]
    return tuple(out)


@functools.lru_cache(maxsize=64)
def power_tile_lists(q_len: int, k_len: int, block_m: int, block_n: int, block: int, window_blocks: int,
                     device: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """PowerAttention block masks for tiles block_m x block_n, cached: ``by_query`` lists the key
    tiles of each query tile (forward, dQ), ``by_key`` the query tiles of each key tile (dK/dV)."""
    some, every, q_whole, k_whole = _power_tile_classes(q_len, k_len, block_m, block_n, block, window_blocks)
    return {
        "by_query": _tile_lists(some, every & k_whole, device),
        "by_key": _tile_lists(some.T, (every & q_whole).T, device),
    }


def _check(q, k, v, key_padding) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash kernel: q, k, v must be 4-D [B, H, T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    ok, reason = supports(D, q.dtype)
    if not ok:
        raise ValueError(reason)
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash kernel: k and v must be [B, Hkv, Tk, D] with q's B and D; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)} for q {tuple(q.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"flash kernel: query heads {H} must be a multiple of kv heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("flash kernel: q, k, v must share dtype and device")
    if key_padding is not None and (key_padding.dtype != torch.bool or tuple(key_padding.shape) != (B, k.shape[2])):
        raise ValueError(f"flash kernel: key_padding must be bool [B, Tk] = [{B}, {k.shape[2]}], got "
                         f"{key_padding.dtype} {tuple(key_padding.shape)}")
    if key_padding is not None and key_padding.device != q.device:
        raise ValueError(f"flash kernel: key_padding is on {key_padding.device}, q on {q.device}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape[2:], x.stride()[2:]))
        assert span <= _INT32_MAX, f"flash kernel: one head of {name} spans {span} elements (> int32)"


def _padding_args(key_padding, q):
    if key_padding is None:
        return q, 0, 0
    kpad = key_padding.view(torch.uint8)
    return kpad, kpad.stride(0), kpad.stride(1)


def _forward(q, k, v, scale, spec: _Pattern, key_padding, tile_count=None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = flash_config(D, spec.name)
    o = launch.alloc((B, H, Tq, D), q.dtype, q.device)
    lse = launch.alloc((B, H, Tq), torch.float32, q.device)
    if Tq == 0:
        return o, lse
    kpad, stride_pb, stride_pn = _padding_args(key_padding, q)
    if spec.name == "power":
        lists = power_tile_lists(Tq, Tk, cfg.block_m, cfg.block_n, spec.block, spec.window_blocks, str(q.device))
        full_cnt, full_idx, part_cnt, part_idx = lists["by_query"]
        list_strides = (full_idx.stride(0), part_idx.stride(0))
    else:
        full_cnt = full_idx = part_cnt = part_idx = lse  # unused: the kernel computes its tile runs
        list_strides = (0, 0)
    grid = (B * H, triton.cdiv(Tq, cfg.block_m))
    flash_fwd_kernel[grid](
        q, k, v, o, lse, kpad, full_cnt, full_idx, part_cnt, part_idx,
        lse if tile_count is None else tile_count,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        stride_pb, stride_pn, *list_strides,
        H, Tq, Tk, scale * LOG2E,
        HEAD_DIM=D, PATTERN=spec.name, IS_CAUSAL=spec.causal, WINDOW=spec.window, SINKS=spec.sinks,
        PBLOCK=spec.block, PWINDOW=spec.window_blocks, GROUP=H // Hkv, HAS_PADDING=key_padding is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=launch.interpreting(), DOT_PRECISION=launch.dot_precision(q.dtype),
        COUNT_TILES=tile_count is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, scale, spec: _Pattern, key_padding, tile_count=None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = flash_config(D, spec.name)
    dq = launch.alloc((B, H, Tq, D), q.dtype, q.device)
    dk = launch.alloc((B, Hkv, Tk, D), k.dtype, k.device)
    dv = launch.alloc((B, Hkv, Tk, D), v.dtype, v.device)
    if Tq == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = launch.alloc((B, H, Tq), torch.float32, q.device)
    flash_bwd_preprocess_kernel[(B * H, triton.cdiv(Tq, cfg.block_m2))](
        o, do, delta, *o.stride(), *do.stride(), H, Tq, HEAD_DIM=D, BLOCK_M=cfg.block_m2,
    )
    kpad, stride_pb, stride_pn = _padding_args(key_padding, q)
    if spec.name == "power":
        by_query = power_tile_lists(Tq, Tk, cfg.block_m2, cfg.block_n2, spec.block, spec.window_blocks,
                                    str(q.device))["by_query"]
        by_key = power_tile_lists(Tq, Tk, cfg.block_m1, cfg.block_n1, spec.block, spec.window_blocks,
                                  str(q.device))["by_key"]
        list_strides = (by_query[1].stride(0), by_query[3].stride(0), by_key[1].stride(0), by_key[3].stride(0))
    else:
        by_query = by_key = (lse,) * 4  # unused: the kernel computes its tile runs
        list_strides = (0, 0, 0, 0)
    n_kv_tiles = triton.cdiv(Tk, cfg.block_n1)
    grid = (B * Hkv, n_kv_tiles + triton.cdiv(Tq, cfg.block_m2))
    flash_bwd_kernel[grid](
        q, k, v, do, lse, delta, dq, dk, dv, kpad, *by_query, *by_key,
        lse if tile_count is None else tile_count,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        stride_pb, stride_pn, *list_strides,
        H, Hkv, Tq, Tk, scale, scale * LOG2E, n_kv_tiles,
        HEAD_DIM=D, PATTERN=spec.name, IS_CAUSAL=spec.causal, WINDOW=spec.window, SINKS=spec.sinks,
        PBLOCK=spec.block, PWINDOW=spec.window_blocks, GROUP=H // Hkv, HAS_PADDING=key_padding is not None,
        BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
        UPCAST=launch.interpreting(), DOT_PRECISION=launch.dot_precision(q.dtype), COUNT_TILES=tile_count is not None,
        num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages,
    )
    return dq, dk, dv


def flash_attention_fwd(q, k, v, *, scale: float, causal: bool, pattern: str = "dense", window: int = 0,
                        sinks: int = 0, block: int = 0, window_blocks: int = 0, key_padding=None):
    """Forward: (o [B, H, Tq, D] contiguous in q's dtype, lse [B, H, Tq] float32, natural log).

    Raises ValueError for inputs the kernels do not handle (the caller then uses the reference).
    """
    spec = _pattern(pattern, causal, window, sinks, block, window_blocks)
    _check(q, k, v, key_padding)
    return _forward(q, k, v, float(scale), spec, key_padding)


def flash_attention_bwd(do, q, k, v, o, lse, *, scale: float, causal: bool, pattern: str = "dense",
                        window: int = 0, sinks: int = 0, block: int = 0, window_blocks: int = 0,
                        key_padding=None):
    """Backward of ``flash_attention_fwd``: (dq, dk, dv), contiguous, in the inputs' dtypes.

    dk and dv of a kv head sum over the query heads of its GQA group.
    """
    spec = _pattern(pattern, causal, window, sinks, block, window_blocks)
    _check(q, k, v, key_padding)
    if do.shape != q.shape or o.shape != q.shape or tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"flash kernel: do and o must be q's shape {tuple(q.shape)} and lse [B, H, Tq]; got "
                         f"{tuple(do.shape)}, {tuple(o.shape)}, {tuple(lse.shape)}")
    return _backward(do, q, k, v, o, lse.float(), float(scale), spec, key_padding)


def visited_tiles(q_len: int, k_len: int | None = None, *, causal: bool = True, pattern: str = "dense",
                  window: int = 0, sinks: int = 0, block: int = 0, window_blocks: int = 0,
                  head_dim: int = 16, device=None) -> dict[str, torch.Tensor]:
    """Debug helper: how many tiles each program visits, as counted by the kernels themselves.

    Runs forward and backward once on zeros (one batch, one head) and returns int32 tensors:
    ``fwd`` per query tile, ``dkdv`` per key tile, ``dq`` per query tile.
    """
    k_len = q_len if k_len is None else k_len
    device = device or ("cpu" if launch.interpreting() else "cuda")
    spec = _pattern(pattern, causal, window, sinks, block, window_blocks)
    dtype = torch.float32 if launch.interpreting() else torch.float16
    q = torch.zeros(1, 1, q_len, head_dim, dtype=dtype, device=device)
    k = torch.zeros(1, 1, k_len, head_dim, dtype=dtype, device=device)
    cfg = flash_config(head_dim, spec.name)
    n_q, n_kv = triton.cdiv(q_len, cfg.block_m), triton.cdiv(k_len, cfg.block_n1)
    fwd_count = torch.zeros(n_q, dtype=torch.int32, device=device)
    bwd_count = torch.zeros(n_kv + triton.cdiv(q_len, cfg.block_m2), dtype=torch.int32, device=device)
    o, lse = _forward(q, k, k, 1.0, spec, None, tile_count=fwd_count)
    _backward(o, q, k, k, o, lse, 1.0, spec, None, tile_count=bwd_count)
    dq_count = bwd_count[n_kv:].flip(0)  # dQ programs run the last query tile first
    return {"fwd": fwd_count.cpu(), "dkdv": bwd_count[:n_kv].cpu(), "dq": dq_count.cpu()}
