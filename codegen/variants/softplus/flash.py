"""LSSA and LSSAR softplus attention in Triton, flash-style, forward and backward (VARIANTS.md §5.1, §5.4).

With q̂, k̂ the l2-normalized rows (normalized by the caller, so autograd differentiates the
normalization) and c_i = log(D)·log(n_i) per query row (n_i its number of allowed keys):

    a_ij = softplus(c_i · q̂_i·k̂_j)  for j in A_i (j <= i when causal, minus padded keys), else 0
    l_i  = Σ_j a_ij,   o_i = Σ_j a_ij v_j / (l_i + eps)

|c_i q̂·k̂| <= log D · log N (about 50 at D = 128, N = 32768), so a_ij stays finite in fp32 and no
running maximum is needed: the numerator and the normalizer accumulate in one pass over the keys,
O(N·D) memory, key tiles past the causal limit skipped. A row with no allowed key has l = 0, o = 0.

What the kernels do per score, in log2 units (y = c_i·log2(e)·q̂·k̂, so a/ln 2 = max(y, 0) + log2(1 + 2^-|y|);
the ln 2 cancels in a / Σ a and is folded into l, r and eps): one exp2, t = 2^-|y|, on the special-function
unit, and log2(1 + t) as a polynomial on the FMA units (`_log2_1p`). The backward's sigmoid shares that
t (1/(1+t) or t/(1+t)). Each pass splits its tiles into those at an edge (the diagonal, a length; masked)
and those away from it (no mask but key padding, unmasked loads when the head dims are powers of two).

Backward, with r_i = 1/(l_i + eps) and δ_i = -r_i (do_i·o_i) (precomputed, one row each):

    da_ij = r_i (do_i·v_j) + δ_i,   ds_ij = da_ij · c_i · sigmoid(c_i q̂_i·k̂_j)   (allowed pairs)
    dq̂_i = Σ_j ds_ij k̂_j,   dk̂_j = Σ_i ds_ij q̂_i,   dv_j = Σ_i r_i a_ij do_i

`_dq` runs one program per query tile over the key tiles; `_dkv` one per key tile and kv head over
the query tiles of every query head of its GQA group (dk, dv of a kv head sum over its group); `_dkv` builds
its tiles as [keys, rows] (k·qᵀ, v·dOᵀ: TRANS), so the dk and dv products take them untransposed.
LSSA and LSSAR share the kernels: REWEIGHT (a constexpr: 0 LSSA; p for an integer p, whose powers the kernels
form by multiplication; -1 for another p, in the log form) adds LSSAR's second pass and terms; in the
backward an LSSA row is an LSSAR row that kept no entry (da = r·dp + beta with beta = -r D).

LSSAR (reweight_p = p > 0, §5.4), with r_i = 1/(l_i + eps), offset o_i = 0 for query rows 0, 1, 2
(0-indexed) and 1 otherwise, n_i the row's number of allowed keys:

    x_ij = n_i r_i a_ij − o_i,   kept_ij = allowed and x_ij > 0,   z_ij = p log x_ij (kept, else −inf)
    A2_i = softmax_j z_ij,  out_i = Σ_j A2_ij v_j   if row i keeps any entry (K_i), else the LSSA out_i

With REWEIGHT, `_fwd` makes two passes over the keys per query tile. Pass 1 is the LSSA pass (l_i and the LSSA
output, which rows without a kept entry return); pass 2 recomputes a_ij, forms x_ij with the full
l_i and runs an online softmax (running max m_i, sum s_i, accumulator) over z_ij, which never forms
x^p (overflows fp32 for n ≳ 350 at p = 15). It saves l_i and lse_i = m_i + log s_i (−inf where the
row kept nothing: that is the row's K_i).

Backward. With dO_i the output gradient and D_i = dO_i·out_i, P_ij = dO_i·v_j, for rows with K_i:

    dz_ij = A2_ij (P_ij − D_i)                          (softmax; A2_ij = exp(z_ij − lse_i))
    dx_ij = dz_ij · p / x_ij                            (kept entries; 0 elsewhere, the ReLU's flat side)
    x_ik depends on a_ik directly (n_i r_i) and on every a_ij through l_i (−n_i r_i² a_ik), so
    da_ij = n_i r_i (dx_ij − r_i R_i),   R_i = Σ_j dx_ij a_ij     (da on every allowed j, kept or not)
    dv_j  = Σ_i A2_ij dO_i
and for rows without K_i the LSSA gradient da_ij = r_i (P_ij − D_i), dv_j = Σ_i r_i a_ij dO_i. Then
as in LSSA ds_ij = da_ij · c_i · sigmoid(c_i q̂_i·k̂_j), dq̂_i = Σ_j ds_ij k̂_j, dk̂_j = Σ_i ds_ij q̂_i.
R_i is a row reduction over all keys, so `_dq` makes one extra pass per query tile (ROW_SUM) before
the `_dq` and `_dkv` passes; the launcher folds the row terms into beta_i = −n_i r_i² R_i (K_i) or −r_i D_i (not K_i),
so da_ij = n_i r_i dx_ij + beta_i or r_i P_ij + beta_i. (Σ_j dz_ij = 0, so R_i = 0 on rows with o_i = 0.)
These formulas match autograd of the reference in float64 to 1e-15 (tests check the kernels against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attncc.codegen import launch

from .reference import UNSHIFTED_ROWS  # query rows 0, 1, 2 have offset 0

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


def supports(head_dim: int, value_dim: int, dtype: torch.dtype, reweight_p: float) -> str | None:
    """Why these kernels cannot serve the configuration (the reference runs instead), or None."""
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM):
        return f"softplus kernel: head dims up to {MAX_HEAD_DIM}, got {head_dim} and {value_dim}"
    if dtype not in DTYPES:
        return f"softplus kernel: dtype {dtype} is not supported (float16, bfloat16, float32)"
    return None




LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


@triton.jit
def _log2_1p(t):
    """log2(1 + t) for t in [0, 1] as t·Q(t), Q the degree-6 least-squares fit of log2(1 + t) / t on
    Chebyshev nodes (relative error below 1.5e-6 in fp32). It runs on the FMA units: the special-function
    unit, which computes exp2 and log2 at an eighth of the FMA rate, then serves one exp2 per score."""
    q = 0.020490589807666736 * t - 0.09606737640876806
    q = q * t + 0.21559036009179447
    q = q * t - 0.33924912084412434
    q = q * t + 0.47770639714631535
    q = q * t - 0.7211628016446693
    q = q * t + 1.442693259738793
    return q * t


@triton.jit
def _ipow(x, P: tl.constexpr):
    """x ** P for a constexpr integer 0 <= P < 128, by repeated squaring on the FMA units."""
    out = tl.full(x.shape, 1.0, tl.float32)
    base = x
    for i in tl.static_range(7):
        if (P >> i) & 1:
            out = out * base
        if (P >> (i + 1)) > 0:
            base = base * base
    return out


@triton.jit
def _softplus2(y):
    """softplus in log2 units: softplus(x) / ln 2 for y = x·log2(e)."""
    return tl.maximum(y, 0.0) + _log2_1p(tl.exp2(-tl.abs(y)))


@triton.jit
def _softplus2_sigmoid(y):
    """(softplus(x) / ln 2, sigmoid(x)) for y = x·log2(e), on one exp2: with t = 2^-|y|, sigmoid(x) is
    1 / (1 + t) for x >= 0 and t / (1 + t) below."""
    t = tl.exp2(-tl.abs(y))
    u = 1.0 + t
    return tl.maximum(y, 0.0) + _log2_1p(t), tl.where(y >= 0, 1.0, t) / u


@triton.jit
def _rows_of(x, TRANS: tl.constexpr):
    """A per-query-row vector as a column of a [rows, keys] tile, or (TRANS) as a row of a [keys, rows] one."""
    if TRANS:
        return x[None, :]
    else:  # an else, not a fall-through: Triton compiles a constexpr if's taken branch and what follows it
        return x[:, None]


@triton.jit
def _keys_of(x, TRANS: tl.constexpr):
    """A per-key vector as a row of a [rows, keys] tile, or (TRANS) as a column of a [keys, rows] one."""
    if TRANS:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _allowed(rm, rn, b, kp_ptr, stride_kpb, TQ, TK, CAUSAL: tl.constexpr, PADDED: tl.constexpr,
             EDGE: tl.constexpr, TRANS: tl.constexpr):
    """The allowed pairs of a [rows, keys] tile ([keys, rows] with TRANS). Away from the edges (EDGE false:
    rows and keys inside the lengths, every key at or before every row) only key padding can exclude a
    pair: a single row (column) of keys then."""
    rows = _rows_of(rm, TRANS)
    keys = _keys_of(rn, TRANS)
    if EDGE:
        ok = (rows < TQ) & (keys < TK)
        if CAUSAL:
            ok = ok & (keys <= rows)
        if PADDED:
            ok = ok & _keys_of(tl.load(kp_ptr + b * stride_kpb + rn, mask=rn < TK, other=0) != 0, TRANS)
    else:
        ok = _keys_of(tl.load(kp_ptr + b * stride_kpb + rn) != 0, TRANS)
    return ok


@triton.jit
def _load(ptr, b, h, rows, cols, stride_b, stride_h, stride_t, T, C, EDGE: tl.constexpr, EVEN: tl.constexpr):
    """The [rows, cols] tile of a [B, H, T, C] tensor, zero outside it. EDGE false: every row is inside T;
    EVEN: every column is inside C."""
    ptrs = ptr + b * stride_b + h * stride_h + rows[:, None] * stride_t + cols[None, :]
    if EDGE:
        return tl.load(ptrs, mask=(rows[:, None] < T) & (cols[None, :] < C), other=0.0)
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=cols[None, :] < C, other=0.0)


@triton.jit
def _row(rows_ptr, i, BHT, bh, TQ, rm, EDGE: tl.constexpr):
    if EDGE:
        return tl.load(rows_ptr + i * BHT + bh * TQ + rm, mask=rm < TQ, other=0.0)
    return tl.load(rows_ptr + i * BHT + bh * TQ + rm)


@triton.jit
def _key_tiles(pm, TK, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """(whole, hi): query tile pm reads keys [0, hi); the tiles before `whole` are away from the edges."""
    if CAUSAL:
        return (tl.minimum(pm * BM + 1, TK) // BN) * BN, tl.minimum(TK, (pm + 1) * BM)
    return (TK // BN) * BN, TK


@triton.jit
def _lssa_tile(acc, l, q, c2, start, b, kvh, rm, rd, rdv, k_ptr, v_ptr, kp_ptr, TQ, TK, D, DV,
               stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_kpb,
               BN: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr, EDGE: tl.constexpr,
               EVEN: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of LSSA's pass: acc += a·v, l += Σ a (a in log2 units)."""
    rn = start + tl.arange(0, BN)
    k = _load(k_ptr, b, kvh, rn, rd, stride_kb, stride_kh, stride_kt, TK, D, EDGE, EVEN)
    v = _load(v_ptr, b, kvh, rn, rdv, stride_vb, stride_vh, stride_vt, TK, DV, EDGE, EVEN)
    a = _softplus2(c2[:, None] * tl.dot(q, tl.trans(k), input_precision=PRECISION))
    if EDGE or PADDED:
        a = tl.where(_allowed(rm, rn, b, kp_ptr, stride_kpb, TQ, TK, CAUSAL, PADDED, EDGE, False), a, 0.0)
    return tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION), l + tl.sum(a, axis=1)


@triton.jit
def _lssar_tile(acc, m, total, q, c2, nr2, off, P, start, b, kvh, rm, rd, rdv, k_ptr, v_ptr, kp_ptr, TQ, TK, D, DV,
                stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_kpb,
                BN: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr, EDGE: tl.constexpr,
                EVEN: tl.constexpr, PRECISION: tl.constexpr, REWEIGHT: tl.constexpr):
    """One key tile of LSSAR's pass: the online softmax over z = p log x. With an integer p (REWEIGHT > 0)
    the running maximum m is that of x and the weights are (x / m)^p, by multiplication; else m is that
    of z in log2 units and the weights are exp2(z - m)."""
    rn = start + tl.arange(0, BN)
    k = _load(k_ptr, b, kvh, rn, rd, stride_kb, stride_kh, stride_kt, TK, D, EDGE, EVEN)
    v = _load(v_ptr, b, kvh, rn, rdv, stride_vb, stride_vh, stride_vt, TK, DV, EDGE, EVEN)
    x = nr2[:, None] * _softplus2(c2[:, None] * tl.dot(q, tl.trans(k), input_precision=PRECISION)) - off[:, None]
    kept = x > 0
    if EDGE or PADDED:
        kept = kept & _allowed(rm, rn, b, kp_ptr, stride_kpb, TQ, TK, CAUSAL, PADDED, EDGE, False)
    if REWEIGHT > 0:
        x = tl.where(kept, x, 0.0)
        m_new = tl.maximum(m, tl.max(x, axis=1))  # m starts at 0
        inv = 1.0 / tl.where(m_new > 0, m_new, 1.0)
        alpha = _ipow(m * inv, REWEIGHT)
        w = _ipow(x * inv[:, None], REWEIGHT)  # 0 where not kept
    else:
        z = tl.where(kept, P * tl.log2(tl.where(kept, x, 1.0)), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(z - m_safe[:, None])  # 0 where z = -inf
    acc = tl.dot(w.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, total * alpha + tl.sum(w, axis=1)


@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, c_ptr, n_ptr, kp_ptr, o_ptr, l_ptr, lse_ptr,
         TQ, TK, H, HKV, D, DV, eps, P,
         stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
         stride_kpb,
         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr,
         PADDED: tl.constexpr, PRECISION: tl.constexpr, UNSHIFTED: tl.constexpr, REWEIGHT: tl.constexpr,
         EVEN: tl.constexpr):
    """One query tile: pass 1 is LSSA (row sums l and the LSSA output); with REWEIGHT, pass 2 the online
    softmax over z = p log x of LSSAR (rows that keep no entry return the LSSA output)."""
    pm = tl.num_programs(0) - 1 - tl.program_id(0)  # the heaviest causal tiles start first
    bh = tl.program_id(1).to(tl.int64)  # offsets past 2^31 elements (B·H·T·D) stay right
    b = bh // H
    h = bh % H
    kvh = h // (H // HKV)
    rm = pm * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    rdv = tl.arange(0, BDV)
    q = _load(q_ptr, b, h, rm, rd, stride_qb, stride_qh, stride_qt, TQ, D, True, EVEN)
    c2 = tl.load(c_ptr + b * TQ + rm, mask=rm < TQ, other=0.0) * _LOG2E
    whole, hi = _key_tiles(pm, TK, BM, BN, CAUSAL)
    acc = tl.zeros((BM, BDV), dtype=tl.float32)
    l = tl.zeros((BM,), dtype=tl.float32)
    for start in range(0, whole, BN):
        acc, l = _lssa_tile(acc, l, q, c2, start, b, kvh, rm, rd, rdv, k_ptr, v_ptr, kp_ptr, TQ, TK, D, DV,
                            stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_kpb,
                            BN, CAUSAL, PADDED, False, EVEN, PRECISION)
    for start in range(whole, hi, BN):
        acc, l = _lssa_tile(acc, l, q, c2, start, b, kvh, rm, rd, rdv, k_ptr, v_ptr, kp_ptr, TQ, TK, D, DV,
                            stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_kpb,
                            BN, CAUSAL, PADDED, True, EVEN, PRECISION)
    l = l * _LN2
    r = 1.0 / (l + eps)
    o = acc * (r * _LN2)[:, None]
    if REWEIGHT:
        n = tl.load(n_ptr + b * TQ + rm, mask=rm < TQ, other=0.0)
        off = tl.where(rm >= UNSHIFTED, 1.0, 0.0)
        nr2 = n * r * _LN2
        acc = tl.zeros((BM, BDV), dtype=tl.float32)
        if REWEIGHT > 0:
            m = tl.zeros((BM,), dtype=tl.float32)
        else:
            m = tl.full((BM,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, whole, BN):
            acc, m, total = _lssar_tile(acc, m, total, q, c2, nr2, off, P, start, b, kvh, rm, rd, rdv, k_ptr, v_ptr,
                                        kp_ptr, TQ, TK, D, DV, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                                        stride_vt, stride_kpb, BN, CAUSAL, PADDED, False, EVEN, PRECISION, REWEIGHT)
        for start in range(whole, hi, BN):
            acc, m, total = _lssar_tile(acc, m, total, q, c2, nr2, off, P, start, b, kvh, rm, rd, rdv, k_ptr, v_ptr,
                                        kp_ptr, TQ, TK, D, DV, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                                        stride_vt, stride_kpb, BN, CAUSAL, PADDED, True, EVEN, PRECISION, REWEIGHT)
        any_kept = total > 0
        o = tl.where(any_kept[:, None], acc / tl.where(any_kept, total, 1.0)[:, None], o)
        if REWEIGHT > 0:  # lse = log Σ x^p = log total + p log m
            m = P * tl.log2(tl.where(any_kept, m, 1.0))
        lse = tl.where(any_kept, (m + tl.log2(tl.where(any_kept, total, 1.0))) * _LN2, float("-inf"))
        tl.store(lse_ptr + bh * TQ + rm, lse, mask=rm < TQ)
    tl.store(o_ptr + (bh * TQ + rm[:, None]) * DV + rdv[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(rm[:, None] < TQ) & (rdv[None, :] < DV))
    tl.store(l_ptr + bh * TQ + rm, l, mask=rm < TQ)


@triton.jit
def _tile_grads(s, allowed, dp, c, n, off, r, lse2, kept_row, dd, beta, P, REWEIGHT: tl.constexpr,
                MASKED: tl.constexpr, TRANS: tl.constexpr):
    """(a, dx, ds, w) of one tile: a in log2 units, dx_ij (0 off the kept entries), ds_ij, and w_ij the
    weight of dO_i in dv_j. Without REWEIGHT (LSSA), every row is an LSSA row: da = r dp + beta. MASKED:
    `allowed` excludes pairs (else every pair of the tile is allowed). The tiles are [rows, keys], or
    [keys, rows] with TRANS (what dk and dv take as they are); the per-row vectors come as vectors."""
    c = _rows_of(c, TRANS)
    r = _rows_of(r, TRANS)
    beta = _rows_of(beta, TRANS)
    a, sig = _softplus2_sigmoid((c * _LOG2E) * s)
    if REWEIGHT:
        n = _rows_of(n, TRANS)
        dd = _rows_of(dd, TRANS)
        kept_row = _rows_of(kept_row, TRANS)
        x = (n * r * _LN2) * a - _rows_of(off, TRANS)
        kept = (x > 0) & kept_row
        if MASKED:
            kept = kept & allowed
        if REWEIGHT > 0:  # x^p / e^lse = (x·srow)^p and a2 / x = srow·(x·srow)^(p-1), srow = e^(-lse/p) <= 1/x
            srow = tl.exp2(-_rows_of(lse2, TRANS) / P)
            u = tl.where(kept, x, 0.0) * srow
            u_pm1 = _ipow(u, REWEIGHT - 1)
            a2 = u_pm1 * u
            dx = tl.where(kept, (P * srow) * u_pm1 * (dp - dd), 0.0)
        else:
            xs = tl.where(kept, x, 1.0)
            a2 = tl.where(kept, tl.exp2(P * tl.log2(xs) - _rows_of(lse2, TRANS)), 0.0)
            dx = a2 * (dp - dd) * P / xs
        da = tl.where(kept_row, (n * r) * dx, r * dp) + beta
        w = tl.where(kept_row, a2, a * (r * _LN2))
    else:
        dx = a * 0.0
        da = r * dp + beta
        w = a * (r * _LN2)
    ds = da * c * sig
    if MASKED:
        ds = tl.where(allowed, ds, 0.0)
        w = tl.where(allowed, w, 0.0)
    return a, dx, ds, w


@triton.jit
def _bwd_rows(q_ptr, do_ptr, c_ptr, n_ptr, rows_ptr, b, h, bh, rm, rd, rdv, TQ, D, DV, BHT,
              stride_qb, stride_qh, stride_qt, UNSHIFTED: tl.constexpr, EDGE: tl.constexpr, EVEN: tl.constexpr):
    """What the backward reads of one query tile: q, dO and the per-row terms (0 past TQ)."""
    q = _load(q_ptr, b, h, rm, rd, stride_qb, stride_qh, stride_qt, TQ, D, EDGE, EVEN)
    do = _load(do_ptr, 0, bh, rm, rdv, 0, TQ * DV, DV, TQ, DV, EDGE, EVEN)
    if EDGE:
        c = tl.load(c_ptr + b * TQ + rm, mask=rm < TQ, other=0.0)
        n = tl.load(n_ptr + b * TQ + rm, mask=rm < TQ, other=0.0)
    else:
        c = tl.load(c_ptr + b * TQ + rm)
        n = tl.load(n_ptr + b * TQ + rm)
    off = tl.where(rm >= UNSHIFTED, 1.0, 0.0)
    r = _row(rows_ptr, 0, BHT, bh, TQ, rm, EDGE)
    lse2 = _row(rows_ptr, 1, BHT, bh, TQ, rm, EDGE) * _LOG2E
    kept_row = _row(rows_ptr, 2, BHT, bh, TQ, rm, EDGE) != 0
    dd = _row(rows_ptr, 3, BHT, bh, TQ, rm, EDGE)
    beta = _row(rows_ptr, 4, BHT, bh, TQ, rm, EDGE)
    return q, do, c, n, off, r, lse2, kept_row, dd, beta


@triton.jit
def _pair_grads(q, k, do, v, rm, rn, b, kp_ptr, stride_kpb, TQ, TK, c, n, off, r, lse2, kept_row, dd, beta, P,
                CAUSAL: tl.constexpr, PADDED: tl.constexpr, EDGE: tl.constexpr, PRECISION: tl.constexpr,
                REWEIGHT: tl.constexpr, TRANS: tl.constexpr):
    """_tile_grads of the query rows rm and key rows rn: the two tile products s = q·k and dp = dO·v first,
    as [rows, keys] tiles, or (TRANS) as [keys, rows] ones: k·qᵀ and v·dOᵀ, which transpose loaded tiles
    only (the dk and dv products then take ds and w as they are, no register tile is transposed)."""
    if TRANS:
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    allowed = s
    if EDGE or PADDED:
        allowed = _allowed(rm, rn, b, kp_ptr, stride_kpb, TQ, TK, CAUSAL, PADDED, EDGE, TRANS)
    return _tile_grads(s, allowed, dp, c, n, off, r, lse2, kept_row, dd, beta, P, REWEIGHT, EDGE or PADDED, TRANS)


@triton.jit
def _dq_tile(dq, big_r, q, do, c, n, off, r, lse2, kept_row, dd, beta, P, start, b, kvh, rm, rd, rdv,
             k_ptr, v_ptr, kp_ptr, TQ, TK, D, DV, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
             stride_kpb, BN: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr, EDGE: tl.constexpr,
             EVEN: tl.constexpr, PRECISION: tl.constexpr, REWEIGHT: tl.constexpr, ROW_SUM: tl.constexpr):
    rn = start + tl.arange(0, BN)
    k = _load(k_ptr, b, kvh, rn, rd, stride_kb, stride_kh, stride_kt, TK, D, EDGE, EVEN)
    v = _load(v_ptr, b, kvh, rn, rdv, stride_vb, stride_vh, stride_vt, TK, DV, EDGE, EVEN)
    a, dx, ds, w = _pair_grads(q, k, do, v, rm, rn, b, kp_ptr, stride_kpb, TQ, TK, c, n, off, r, lse2, kept_row, dd,
                               beta, P, CAUSAL, PADDED, EDGE, PRECISION, REWEIGHT, False)
    if ROW_SUM:
        big_r += tl.sum(dx * a, axis=1) * _LN2
    else:
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq, big_r


@triton.jit
def _dq(q_ptr, k_ptr, v_ptr, c_ptr, n_ptr, kp_ptr, do_ptr, rows_ptr, out_ptr,
        TQ, TK, H, HKV, D, DV, P, BHT,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_kpb,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr,
        PADDED: tl.constexpr, PRECISION: tl.constexpr, UNSHIFTED: tl.constexpr, REWEIGHT: tl.constexpr,
        EVEN: tl.constexpr, ROW_SUM: tl.constexpr):
    """One query tile over its key tiles: dq̂ [BM, D], or (ROW_SUM) LSSAR's R_i = Σ_j dx_ij a_ij [BM]."""
    pm = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // (H // HKV)
    rm = pm * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    rdv = tl.arange(0, BDV)
    q, do, c, n, off, r, lse2, kept_row, dd, beta = _bwd_rows(q_ptr, do_ptr, c_ptr, n_ptr, rows_ptr, b, h, bh, rm,
                                                              rd, rdv, TQ, D, DV, BHT, stride_qb, stride_qh,
                                                              stride_qt, UNSHIFTED, True, EVEN)
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    big_r = tl.zeros((BM,), dtype=tl.float32)
    whole, hi = _key_tiles(pm, TK, BM, BN, CAUSAL)
    for start in range(0, whole, BN):
        dq, big_r = _dq_tile(dq, big_r, q, do, c, n, off, r, lse2, kept_row, dd, beta, P, start, b, kvh, rm, rd, rdv,
                             k_ptr, v_ptr, kp_ptr, TQ, TK, D, DV, stride_kb, stride_kh, stride_kt, stride_vb,
                             stride_vh, stride_vt, stride_kpb, BN, CAUSAL, PADDED, False, EVEN, PRECISION, REWEIGHT,
                             ROW_SUM)
    for start in range(whole, hi, BN):
        dq, big_r = _dq_tile(dq, big_r, q, do, c, n, off, r, lse2, kept_row, dd, beta, P, start, b, kvh, rm, rd, rdv,
                             k_ptr, v_ptr, kp_ptr, TQ, TK, D, DV, stride_kb, stride_kh, stride_kt, stride_vb,
                             stride_vh, stride_vt, stride_kpb, BN, CAUSAL, PADDED, True, EVEN, PRECISION, REWEIGHT,
                             ROW_SUM)
    if ROW_SUM:
        tl.store(out_ptr + bh * TQ + rm, big_r, mask=rm < TQ)
    else:
        tl.store(out_ptr + (bh * TQ + rm[:, None]) * D + rd[None, :], dq.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < TQ) & (rd[None, :] < D))


@triton.jit
def _dkv_tile(dk, dv, k, v, start, b, h, bh, rn, rd, rdv, q_ptr, do_ptr, c_ptr, n_ptr, rows_ptr, kp_ptr,
              TQ, TK, D, DV, P, BHT, stride_qb, stride_qh, stride_qt, stride_kpb,
              BM: tl.constexpr, CAUSAL: tl.constexpr, PADDED: tl.constexpr, EDGE: tl.constexpr,
              EVEN: tl.constexpr, PRECISION: tl.constexpr, UNSHIFTED: tl.constexpr, REWEIGHT: tl.constexpr):
    rm = start + tl.arange(0, BM)
    q, do, c, n, off, r, lse2, kept_row, dd, beta = _bwd_rows(q_ptr, do_ptr, c_ptr, n_ptr, rows_ptr, b, h, bh, rm,
                                                              rd, rdv, TQ, D, DV, BHT, stride_qb, stride_qh,
                                                              stride_qt, UNSHIFTED, EDGE, EVEN)
    a, dx, ds, w = _pair_grads(q, k, do, v, rm, rn, b, kp_ptr, stride_kpb, TQ, TK, c, n, off, r, lse2, kept_row, dd,
                               beta, P, CAUSAL, PADDED, EDGE, PRECISION, REWEIGHT, True)
    dv = tl.dot(w.to(do.dtype), do, dv, input_precision=PRECISION)  # w, ds: [keys, rows]
    dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkv(q_ptr, k_ptr, v_ptr, c_ptr, n_ptr, kp_ptr, do_ptr, rows_ptr, dk_ptr, dv_ptr,
         TQ, TK, H, HKV, D, DV, P, BHT,
         stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
         stride_kpb,
         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, CAUSAL: tl.constexpr,
         PADDED: tl.constexpr, PRECISION: tl.constexpr, UNSHIFTED: tl.constexpr, REWEIGHT: tl.constexpr,
         EVEN: tl.constexpr):
    """One key tile of one kv head over the query tiles of every query head of its group: dk̂, dv.
    Query tiles [lo, f_lo) and [f_hi, end) are at an edge; [f_lo, f_hi) are whole and wholly after the keys."""
    pn = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // HKV
    kvh = bkv % HKV
    group = H // HKV
    rn = pn * BN + tl.arange(0, BN)
    rd = tl.arange(0, BD)
    rdv = tl.arange(0, BDV)
    k = _load(k_ptr, b, kvh, rn, rd, stride_kb, stride_kh, stride_kt, TK, D, True, EVEN)
    v = _load(v_ptr, b, kvh, rn, rdv, stride_vb, stride_vh, stride_vt, TK, DV, True, EVEN)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dv = tl.zeros((BN, BDV), dtype=tl.float32)
    end = tl.cdiv(TQ, BM) * BM
    lo = 0
    f_lo = 0
    if CAUSAL:
        lo = (pn * BN // BM) * BM
        f_lo = tl.cdiv(pn * BN + BN - 1, BM) * BM
    f_lo = tl.minimum(tl.maximum(f_lo, lo), end)
    f_hi = tl.maximum(f_lo, (TQ // BM) * BM)
    key_whole = pn * BN + BN <= TK
    f_lo = tl.where(key_whole, f_lo, end)
    f_hi = tl.where(key_whole, f_hi, end)
    for g in range(group):
        h = kvh * group + g
        bh = b * H + h
        for start in range(lo, f_lo, BM):
            dk, dv = _dkv_tile(dk, dv, k, v, start, b, h, bh, rn, rd, rdv, q_ptr, do_ptr, c_ptr, n_ptr, rows_ptr,
                               kp_ptr, TQ, TK, D, DV, P, BHT, stride_qb, stride_qh, stride_qt, stride_kpb, BM, CAUSAL,
                               PADDED, True, EVEN, PRECISION, UNSHIFTED, REWEIGHT)
        for start in range(f_lo, f_hi, BM):
            dk, dv = _dkv_tile(dk, dv, k, v, start, b, h, bh, rn, rd, rdv, q_ptr, do_ptr, c_ptr, n_ptr, rows_ptr,
                               kp_ptr, TQ, TK, D, DV, P, BHT, stride_qb, stride_qh, stride_qt, stride_kpb, BM, CAUSAL,
                               PADDED, False, EVEN, PRECISION, UNSHIFTED, REWEIGHT)
        for start in range(f_hi, end, BM):
            dk, dv = _dkv_tile(dk, dv, k, v, start, b, h, bh, rn, rd, rdv, q_ptr, do_ptr, c_ptr, n_ptr, rows_ptr,
                               kp_ptr, TQ, TK, D, DV, P, BHT, stride_qb, stride_qh, stride_qt, stride_kpb, BM, CAUSAL,
                               PADDED, True, EVEN, PRECISION, UNSHIFTED, REWEIGHT)
    tl.store(dk_ptr + (bkv * TK + rn[:, None]) * D + rd[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=(rn[:, None] < TK) & (rd[None, :] < D))
    tl.store(dv_ptr + (bkv * TK + rn[:, None]) * DV + rdv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=(rn[:, None] < TK) & (rdv[None, :] < DV))


@dataclass(frozen=True)
class Config:
    """Tiles and launch parameters: the forward's BM x BN; the backward's dK/dV programs own BN1 keys
    and step over BM1 queries, its dQ programs own BM2 queries and step over BN2 keys."""

    bm: int
    bn: int
    num_warps: int
    num_stages: int
    bm1: int
    bn1: int
    bm2: int
    bn2: int
    bwd_num_warps: int
    bwd_num_stages: int


_INTERPRETER_CONFIG = Config(32, 16, 4, 1, 16, 32, 32, 16, 4, 1)  # tiles of unequal sizes both ways
# Chosen on the H200 by bench/tune_softplus.py (D = 128, bf16, causal, N = 32768; bench/results_softplus_attnres.md).
# When _dkv built its tiles as [rows, keys] and transposed ds and w for the dk and dv products, bm1 = 32 < bn1 = 64
# gave a different dk on each call of the same inputs on the H200 (triton 3.6; relative error 0.16-0.48 against
# 0.046), which the CPU interpreter does not show. Built as [keys, rows] (TRANS), the same tiles are deterministic
# (tune_softplus.py checks it, and a GPU test) and the fastest backward: LSSA 56.0, LSSAR 114.0 ms fwd+bwd.
_GPU_CONFIG = Config(128, 64, 8, 3, 32, 64, 64, 32, 4, 3)


def config() -> Config:
    """The tiles: one config under the interpreter, one on the GPU (LSSA and LSSAR alike);
    ``ATTNCC_SOFTPLUS_CONFIG`` (a JSON list of Config's ten fields) overrides them, for tuning and tests."""
    return launch.tiles("ATTNCC_SOFTPLUS_CONFIG", Config, _INTERPRETER_CONFIG, _GPU_CONFIG)


def _reweight(p: float) -> int:
    """The kernels' REWEIGHT: 0 for LSSA; p itself for LSSAR with an integer p below 128 (powers by
    multiplication); -1 for any other p (the log form)."""
    if p <= 0:
        return 0
    return int(p) if p == int(p) and p < 128 else -1


def _common(q, k, v, key_padding):
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    kp, stride_kpb, padded = launch.key_padding(key_padding, q)
    D, DV = q.shape[-1], v.shape[-1]
    BD, BDV = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    return q, k, v, kp, stride_kpb, padded, dict(BD=BD, BDV=BDV, EVEN=BD == D and BDV == DV)


def _forward(q, k, v, c, n, key_padding, causal: bool, p: float, eps: float):
    B, H, TQ, D = q.shape
    HKV, TK, DV = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v, kp, stride_kpb, padded, blocks = _common(q, k, v, key_padding)
    cfg = config()
    o = launch.alloc((B, H, TQ, DV), q.dtype, q.device)
    l = launch.alloc((B, H, TQ), torch.float32, q.device)
    lse = launch.alloc((B, H, TQ), torch.float32, q.device) if p > 0 else l
    c = c.float().contiguous()
    n = n.float().contiguous() if n is not None else c
    _fwd[(triton.cdiv(TQ, cfg.bm), B * H)](
        q, k, v, c, n, kp, o, l, lse, TQ, TK, H, HKV, D, DV, float(eps), float(p),
        *launch.strides(q), *launch.strides(k), *launch.strides(v), stride_kpb, CAUSAL=causal, PADDED=padded,
        PRECISION=launch.dot_precision(q.dtype), UNSHIFTED=UNSHIFTED_ROWS, REWEIGHT=_reweight(p), BM=cfg.bm, BN=cfg.bn,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **blocks)
    return o, l, lse


def _backward(do, q, k, v, c, n, o, l, lse, key_padding, causal: bool, p: float, eps: float):
    B, H, TQ, D = q.shape
    HKV, TK, DV = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v, kp, stride_kpb, padded, blocks = _common(q, k, v, key_padding)
    cfg = config()
    c = c.float().contiguous()
    n = n.float().contiguous() if n is not None else c
    r = 1.0 / (l + eps)
    dd = (do.float() * o.float()).sum(-1)
    kept = torch.isfinite(lse) if p > 0 else torch.zeros_like(l, dtype=torch.bool)
    # per-row terms: r, lse (0 where the row kept nothing), K, D = dO·o, beta (LSSA rows: -r D)
    rows = torch.stack([r, torch.where(kept, lse, 0.0), kept.float(), dd, -r * dd]).contiguous()
    do = do.to(q.dtype).contiguous()
    common = (TQ, TK, H, HKV, D, DV, float(p), B * H * TQ, *launch.strides(q), *launch.strides(k), *launch.strides(v), stride_kpb)
    flags = dict(CAUSAL=causal, PADDED=padded, PRECISION=launch.dot_precision(q.dtype), UNSHIFTED=UNSHIFTED_ROWS,
                 REWEIGHT=_reweight(p), num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages, **blocks)
    grid_q = (triton.cdiv(TQ, cfg.bm2), B * H)
    if p > 0:  # LSSAR rows that kept an entry: beta = -n r² R, R a row reduction over every key
        big_r = launch.alloc((B, H, TQ), torch.float32, q.device)
        _dq[grid_q](q, k, v, c, n, kp, do, rows, big_r, *common, ROW_SUM=True, BM=cfg.bm2, BN=cfg.bn2, **flags)
        rows[4] = torch.where(kept, -n[:, None, :] * r * r * big_r, rows[4])
    dq = launch.alloc((B, H, TQ, D), q.dtype, q.device)
    dk = launch.alloc((B, HKV, TK, D), k.dtype, q.device)
    dv = launch.alloc((B, HKV, TK, DV), v.dtype, q.device)
    _dq[grid_q](q, k, v, c, n, kp, do, rows, dq, *common, ROW_SUM=False, BM=cfg.bm2, BN=cfg.bn2, **flags)
    _dkv[(triton.cdiv(TK, cfg.bn1), B * HKV)](q, k, v, c, n, kp, do, rows, dk, dv, *common, BM=cfg.bm1, BN=cfg.bn1,
                                                **flags)
    return dq, dk, dv


def lssa_fwd(q, k, v, c, *, key_padding=None, causal: bool, eps: float):
    """(o [B, H, Tq, Dv] in q's dtype, l [B, H, Tq] fp32). q, k: l2-normalized rows; c [B, Tq] fp32."""
    o, l, _ = _forward(q, k, v, c, None, key_padding, causal, 0.0, eps)
    return o, l


def lssa_bwd(do, q, k, v, c, o, l, *, key_padding=None, causal: bool, eps: float):
    """(dq̂, dk̂, dv) of lssa_fwd's output."""
    return _backward(do, q, k, v, c, None, o, l, l, key_padding, causal, 0.0, eps)


def lssar_fwd(q, k, v, c, n, *, key_padding=None, causal: bool, p: float, eps: float):
    """(o [B, H, Tq, Dv] in q's dtype, l, lse [B, H, Tq] fp32; lse = −inf where the row kept no entry).
    q, k: l2-normalized rows; c, n [B, Tq] fp32 (row scales, allowed-key counts)."""
    return _forward(q, k, v, c, n, key_padding, causal, p, eps)


def lssar_bwd(do, q, k, v, c, n, o, l, lse, *, key_padding=None, causal: bool, p: float, eps: float):
    """(dq̂, dk̂, dv) of lssar_fwd's output."""
    return _backward(do, q, k, v, c, n, o, l, lse, key_padding, causal, p, eps)
