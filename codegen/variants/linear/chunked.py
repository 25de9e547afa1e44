"""Chunked linear attention in Triton, forward and backward (VARIANTS.md §2.4, §4.5), for `linear` and MALA.

Per query head h with feature map φ, decay λ = exp(-s_h) (s = 0: no decay) and chunks of BT tokens
(a chunk c starts at t0 = c·BT and has n_c tokens; i, j are offsets inside it):

    S_c  = Σ_{s < t0} λ^{t0-1-s} φ(k_s) v_sᵀ          (the state before chunk c, [D, Dv])
    z_c  = Σ_{s < t0} λ^{t0-1-s} φ(k_s)               (its normalizer, [D])
    num_t = λ^{i+1} φ(q_t)ᵀ S_c + Σ_{j<=i} λ^{i-j} (φ(q_t)·φ(k_j)) v_j
    den_t = λ^{i+1} φ(q_t)·z_c + Σ_{j<=i} λ^{i-j}  φ(q_t)·φ(k_j)
    o_t   = num_t / (den_t + eps)  (normalize)  or  num_t
    S_{c+1} = λ^{n_c} S_c + Σ_j λ^{n_c-1-j} φ(k_j) v_jᵀ

Bidirectional sites use the total state S (and z) for every query and no intra-chunk term. Padded
keys (key_padding False) and positions past the sequence have φ(k) = 0. A query with no visible key
has num = den = 0, so o = 0.

The passes, each massively parallel except the state scans:

    _states      grid (Dv blocks, D blocks, B·HS): scan the chunks, store S_c (and the final state); and,
                 as programs of their own, z_c
    _output      grid (Dv blocks, chunks, B·H): o, den of one chunk from S_c, z_c and the chunk itself
    _dstates     grid (Dv blocks, D blocks, B·H): reverse scan: G_c = ∂L/∂S_{c+1} from the queries after
                 chunk c; and, as programs of their own, dz_c
    _grads_q     grid (chunks, B·H): dq of one chunk
    _grads_k/_v  grid (chunks, B·H): this query head's share of dk (dv) of one chunk

The gradients are three kernels, not one: a program holding dq, dk and dv at once spilled 2.5-4 KB of
registers per thread (ptxas, sm_90, D = 128); split, each needs none at 8 warps, and no tile product is
computed twice (dk takes v·g̃ᵀ, dv takes φ(k)·φ(q)ᵀ, both built as [keys, rows] to be used untransposed).

The backward of o = num/(den+eps) is the backward of the unnormalized form with the value augmented
by a column of ones: with g̃_t = ∂L/∂num_t and δ_t = ∂L/∂den_t (for normalize, g̃ = do/(den+eps),
δ = -(do·o)/(den+eps); MALA passes its own), the score gradient is dW_ts = g̃_t·v_s + δ_t, and

    ∂φ(q_t) = λ^{i+1} (S_c g̃_t + δ_t z_c) + Σ_{j<=i} λ^{i-j} dW_tj φ(k_j)
    ∂φ(k_s) = λ^{n_c-1-j} (G_c v_s + dz_c) + Σ_{t>=s in chunk} λ^{i-j} dW_ts φ(q_t)
    ∂v_s    = λ^{n_c-1-j} G_cᵀ φ(k_s)       + Σ_{t>=s in chunk} λ^{i-j} (φ(q_t)·φ(k_s)) g̃_t

State heads HS: the query heads when there is decay (λ is per query head), else the kv heads (S
depends on k, v only, so a GQA group shares it). The backward's G is per query head; dk and dv are
per query head and summed over each GQA group by the launcher. Feature maps elu1, relu and identity
are applied inside the kernels (taylor2, whose features grow to 1 + D + D², runs the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attncc.codegen import launch

FEATURE_MAPS = ("elu1", "relu", "identity")  # constexpr codes 0, 1, 2
CHUNK = 64
MAX_HEAD_DIM = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(head_dim: int, value_dim: int, dtype: torch.dtype, feature_map: str) -> str | None:
    """Why the chunked kernels cannot serve this configuration (the reference runs instead), or None."""
    if feature_map not in FEATURE_MAPS:
        return f"no linear kernel for feature map {feature_map!r} (kernels: {', '.join(FEATURE_MAPS)})"
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM):
        return f"linear kernel: head dims up to {MAX_HEAD_DIM}, got {head_dim} and {value_dim}"
    if dtype not in DTYPES:
        return f"linear kernel: dtype {dtype} is not supported (float16, bfloat16, float32)"
    if dtype == torch.float32 and max(head_dim, value_dim) > 64 and not launch.interpreting():
        return "linear kernel: float32 with head dims above 64 needs more shared memory than the GPU has"
    return None




@triton.jit
def _phi(x, FMAP: tl.constexpr):
    if FMAP == 0:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == 1:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FMAP: tl.constexpr):
    if FMAP == 0:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == 1:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _load_keys(k_ptr, kp_ptr, b, kvh, t0, T, stride_kb, stride_kh, stride_kt, stride_kpb, D,
               BT: tl.constexpr, BK: tl.constexpr, FMAP: tl.constexpr, PADDED: tl.constexpr, k0=0):
    """(raw k [BT, BK] fp32 of features k0.., φ(k) zeroed past T, past D and at padded keys, key mask [BT])."""
    rt = t0 + tl.arange(0, BT)
    rk = k0 + tl.arange(0, BK)
    inside = rt < T
    if PADDED:
        inside = inside & (tl.load(kp_ptr + b * stride_kpb + rt, mask=rt < T, other=0) != 0)
    ptrs = k_ptr + b * stride_kb + kvh * stride_kh + rt[:, None] * stride_kt + rk[None, :]
    k = tl.load(ptrs, mask=(rt[:, None] < T) & (rk[None, :] < D), other=0.0).to(tl.float32)
    phik = tl.where(inside[:, None] & (rk[None, :] < D), _phi(k, FMAP), 0.0)
    return k, phik, inside


@triton.jit
def _states(k_ptr, v_ptr, kp_ptr, rate_ptr, s_ptr, z_ptr, fs_ptr, fz_ptr, s0_ptr, z0_ptr,
            T, NC, HS, HKV, D, DV,
            stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_kpb,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr,
            PADDED: tl.constexpr, DECAY: tl.constexpr, STORE_CHUNKS: tl.constexpr, INITIAL: tl.constexpr,
            S_PART: tl.constexpr, Z: tl.constexpr, PRECISION: tl.constexpr):
    """Scan the chunks of one state head, for one block of features: S_c of one block of value columns
    (S_PART), or z_c (Z), before each chunk (STORE_CHUNKS), and the final state. The scan is sequential,
    so the state is split into blocks to run many of them at once; the launcher runs the z scans as
    programs of their own, so that the sum of φ(k) over each chunk stays off the S scans' path."""
    pv = tl.program_id(0)
    pk = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HS
    hs = bh % HS
    kvh = hs // (HS // HKV)
    rk = pk * BK + tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    state_mask = (rk[:, None] < D) & (rv[None, :] < DV)
    s = tl.zeros((BK, BV), dtype=tl.float32)
    z = tl.zeros((BK,), dtype=tl.float32)
    if INITIAL:
        if S_PART:
            s = tl.load(s0_ptr + (bh * D + rk[:, None]) * DV + rv[None, :], mask=state_mask, other=0.0)
        if Z:
            z = tl.load(z0_ptr + bh * D + rk, mask=rk < D, other=0.0)
    rate = 0.0
    if DECAY:
        rate = tl.load(rate_ptr + hs).to(tl.float32)
    for c in range(NC):
        t0 = c * BT
        if STORE_CHUNKS:
            if S_PART:
                tl.store(s_ptr + ((bh * NC + c) * D + rk[:, None]) * DV + rv[None, :],
                         s.to(s_ptr.dtype.element_ty), mask=state_mask)
            if Z:
                tl.store(z_ptr + (bh * NC + c) * D + rk, z, mask=rk < D)
        _, phik, _ = _load_keys(k_ptr, kp_ptr, b, kvh, t0, T, stride_kb, stride_kh, stride_kt, stride_kpb, D,
                                BT, BK, FMAP, PADDED, pk * BK)
        if DECAY:
            n = tl.minimum(T - t0, BT)
            weight = tl.where(tl.arange(0, BT) < n, _key_decay(rate, T, t0, BT), 0.0)
            phik = phik * weight[:, None]
            chunk_decay = tl.exp(-rate * n.to(tl.float32))
            s = s * chunk_decay
            z = z * chunk_decay
        if S_PART:
            rt = t0 + tl.arange(0, BT)
            v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + rt[:, None] * stride_vt + rv[None, :],
                        mask=(rt[:, None] < T) & (rv[None, :] < DV), other=0.0)
            s += tl.dot(tl.trans(phik.to(v.dtype)), v, input_precision=PRECISION)
        if Z:
            z += tl.sum(phik, axis=0)
    if S_PART:
        tl.store(fs_ptr + (bh * D + rk[:, None]) * DV + rv[None, :], s, mask=state_mask)
    if Z:
        tl.store(fz_ptr + bh * D + rk, z, mask=rk < D)


@triton.jit
def _output(q_ptr, k_ptr, v_ptr, kp_ptr, rate_ptr, s_ptr, z_ptr, o_ptr, den_ptr,
            T, NC, H, HS, HKV, D, DV, eps,
            stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
            stride_kpb,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr, PADDED: tl.constexpr,
            DECAY: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, Z: tl.constexpr,
            PRECISION: tl.constexpr):
    """One chunk of one query head, one block of value columns: o (and den, from block 0, with Z)."""
    pv = tl.program_id(0)
    c = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    kvh = h // (H // HKV)
    hs = h if DECAY else kvh
    t0 = c * BT
    rt = t0 + tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    # φ(q) in q's dtype: what the tile products take, and den from the same rounded features as num
    _, phiq = _query_features(q_ptr, b, h, rt, rk, (rt[:, None] < T) & (rk[None, :] < D), stride_qb, stride_qh,
                              stride_qt, FMAP)
    dtype = phiq.dtype
    state = (b * HS + hs) * NC + c if CAUSAL else b * HS + hs
    s = _state_tile(s_ptr, state, rk, rv, D, DV)
    num = tl.dot(phiq.to(s.dtype), s, input_precision=PRECISION)
    den = tl.zeros((BT,), dtype=tl.float32)
    if Z:
        z = tl.load(z_ptr + state * D + rk, mask=rk < D, other=0.0)
        den = tl.sum(phiq.to(tl.float32) * z[None, :], axis=1)
    rate = 0.0
    if DECAY:
        rate = tl.load(rate_ptr + h).to(tl.float32)
        q_decay = _query_decay(rate, BT)
        num = num * q_decay[:, None]
        if Z:
            den = den * q_decay
    if CAUSAL:
        _, phik, _ = _load_keys(k_ptr, kp_ptr, b, kvh, t0, T, stride_kb, stride_kh, stride_kt, stride_kpb, D,
                                BT, BK, FMAP, PADDED)
        v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + rt[:, None] * stride_vt + rv[None, :],
                    mask=(rt[:, None] < T) & (rv[None, :] < DV), other=0.0)
        a = _intra(tl.dot(phiq.to(dtype), tl.trans(phik.to(dtype)), input_precision=PRECISION), rate, BT, DECAY,
                   False)
        num += tl.dot(a.to(v.dtype), v, input_precision=PRECISION)
        if Z:
            den += tl.sum(a, axis=1)
    if NORMALIZE:
        num = num / (den + eps)[:, None]
    tl.store(o_ptr + ((bh * T) + rt[:, None]) * DV + rv[None, :], num.to(o_ptr.dtype.element_ty),
             mask=(rt[:, None] < T) & (rv[None, :] < DV))
    if Z:
        if pv == 0:
            tl.store(den_ptr + bh * T + rt, den, mask=rt < T)


@triton.jit
def _dstates(q_ptr, g_ptr, d_ptr, rate_ptr, ds_ptr, dz_ptr,
             T, NC, H, D, DV, stride_qb, stride_qh, stride_qt,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr,
             DECAY: tl.constexpr, CAUSAL: tl.constexpr, G_PART: tl.constexpr, Z: tl.constexpr,
             PRECISION: tl.constexpr):
    """Reverse scan of one query head, one block of features: G_c = ∂L/∂S_{c+1} of one block of value
    columns (G_PART), or dz_c (Z: δ is given), for every chunk c (causal), or the totals Σ_t φ(q_t) g̃_tᵀ and
    Σ_t φ(q_t) δ_t (bidirectional). As in _states, the dz scans are programs of their own."""
    pv = tl.program_id(0)
    pk = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    rk = pk * BK + tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    state_mask = (rk[:, None] < D) & (rv[None, :] < DV)
    g_state = tl.zeros((BK, BV), dtype=tl.float32)
    dz = tl.zeros((BK,), dtype=tl.float32)
    rate = 0.0
    if DECAY:
        rate = tl.load(rate_ptr + h).to(tl.float32)
    for step in range(NC):
        c = NC - 1 - step
        t0 = c * BT
        rt = t0 + tl.arange(0, BT)
        if CAUSAL:
            if G_PART:
                tl.store(ds_ptr + ((bh * NC + c) * D + rk[:, None]) * DV + rv[None, :],
                         g_state.to(ds_ptr.dtype.element_ty), mask=state_mask)
            if Z:
                tl.store(dz_ptr + (bh * NC + c) * D + rk, dz, mask=rk < D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rt[:, None] * stride_qt + rk[None, :],
                    mask=(rt[:, None] < T) & (rk[None, :] < D), other=0.0)
        phiq = tl.where((rt[:, None] < T) & (rk[None, :] < D), _phi(q.to(tl.float32), FMAP), 0.0)
        if DECAY:
            n = tl.minimum(T - t0, BT)
            phiq = phiq * _query_decay(rate, BT)[:, None]
            chunk_decay = tl.exp(-rate * n.to(tl.float32))
            g_state = g_state * chunk_decay
            dz = dz * chunk_decay
        if G_PART:
            g = tl.load(g_ptr + (bh * T + rt[:, None]) * DV + rv[None, :],
                        mask=(rt[:, None] < T) & (rv[None, :] < DV), other=0.0)
            g_state += tl.dot(tl.trans(phiq.to(g.dtype)), g, input_precision=PRECISION)
        if Z:
            d = tl.load(d_ptr + bh * T + rt, mask=rt < T, other=0.0)
            dz += tl.sum(phiq * d[:, None], axis=0)
    if not CAUSAL:
        if G_PART:
            tl.store(ds_ptr + (bh * D + rk[:, None]) * DV + rv[None, :], g_state.to(ds_ptr.dtype.element_ty),
                     mask=state_mask)
        if Z:
            tl.store(dz_ptr + bh * D + rk, dz, mask=rk < D)


@triton.jit
def _chunk(T, H, HKV, D, DV, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A gradient program's chunk and query head (grid (chunks, B·H)), its rows and columns:
    (c, bh, b, h, kvh, t0, rt, rk, rv, row_k, row_v)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t0 = c * BT
    rt = t0 + tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    return (c, bh, b, h, h // (H // HKV), t0, rt, rk, rv, (rt[:, None] < T) & (rk[None, :] < D),
            (rt[:, None] < T) & (rv[None, :] < DV))


@triton.jit
def _state_tile(ptr, index, rk, rv, D, DV):
    """State `index` (an S_c or a G_c) of a [..., D, Dv] buffer, at features rk and value columns rv."""
    return tl.load(ptr + (index * D + rk[:, None]) * DV + rv[None, :], mask=(rk[:, None] < D) & (rv[None, :] < DV),
                   other=0.0)


@triton.jit
def _query_features(q_ptr, b, h, rt, rk, row_k, stride_qb, stride_qh, stride_qt, FMAP: tl.constexpr):
    """(q, φ(q) in q's dtype, 0 past T and D) of the rows rt."""
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rt[:, None] * stride_qt + rk[None, :], mask=row_k, other=0.0)
    return q, tl.where(row_k, _phi(q.to(tl.float32), FMAP), 0.0).to(q.dtype)


@triton.jit
def _query_decay(rate, BT: tl.constexpr):
    """λ^(i+1) of the chunk's rows i: the decay from the state before the chunk to each query."""
    return tl.exp(-rate * (tl.arange(0, BT) + 1).to(tl.float32))


@triton.jit
def _key_decay(rate, T, t0, BT: tl.constexpr):
    """λ^(n-1-j) of the chunk's keys j (n keys): the decay from each key to the state after the chunk."""
    return tl.exp(-rate * tl.maximum(tl.minimum(T - t0, BT) - 1 - tl.arange(0, BT), 0).to(tl.float32))


@triton.jit
def _intra(x, rate, BT: tl.constexpr, DECAY: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """An intra-chunk tile, [rows, keys] (or [keys, rows]: KEYS_FIRST), with the causal mask and the decay
    λ^(i-j) of row i and key j applied."""
    if KEYS_FIRST:
        j = tl.arange(0, BT)[:, None]
        i = tl.arange(0, BT)[None, :]
    else:
        i = tl.arange(0, BT)[:, None]
        j = tl.arange(0, BT)[None, :]
    if DECAY:
        x = x * tl.exp(-rate * tl.maximum(i - j, 0).to(tl.float32))
    return tl.where(j <= i, x, 0.0)


@triton.jit
def _grads_q(q_ptr, k_ptr, v_ptr, kp_ptr, rate_ptr, s_ptr, z_ptr, g_ptr, d_ptr, dq_ptr,
             T, NC, H, HS, HKV, D, DV,
             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
             stride_kpb,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr, PADDED: tl.constexpr,
             DECAY: tl.constexpr, CAUSAL: tl.constexpr, Z: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one chunk of one query head (all value columns: BV >= DV): through S_c, and inside the chunk.
    Without Z there is no δ (nothing reads den), so no term through z."""
    c, bh, b, h, kvh, t0, rt, rk, rv, row_k, row_v = _chunk(T, H, HKV, D, DV, BT, BK, BV)
    hs = h if DECAY else kvh
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rt[:, None] * stride_qt + rk[None, :], mask=row_k, other=0.0)
    dtype = q.dtype
    g = tl.load(g_ptr + (bh * T + rt[:, None]) * DV + rv[None, :], mask=row_v, other=0.0)
    state = (b * HS + hs) * NC + c if CAUSAL else b * HS + hs
    s = _state_tile(s_ptr, state, rk, rv, D, DV)
    dphiq = tl.dot(g.to(s.dtype), tl.trans(s), input_precision=PRECISION)  # through S_c
    if Z:
        d = tl.load(d_ptr + bh * T + rt, mask=rt < T, other=0.0)
        dphiq += d[:, None] * tl.load(z_ptr + state * D + rk, mask=rk < D, other=0.0)[None, :]
    rate = 0.0
    if DECAY:
        rate = tl.load(rate_ptr + h).to(tl.float32)
        dphiq = dphiq * _query_decay(rate, BT)[:, None]
    if CAUSAL:
        _, phik, _ = _load_keys(k_ptr, kp_ptr, b, kvh, t0, T, stride_kb, stride_kh, stride_kt, stride_kpb, D,
                                BT, BK, FMAP, PADDED)
        v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + rt[:, None] * stride_vt + rv[None, :], mask=row_v,
                    other=0.0)
        da = tl.dot(g.to(dtype), tl.trans(v), input_precision=PRECISION)  # [rows, keys]
        if Z:
            da += d[:, None]
        da = _intra(da, rate, BT, DECAY, False)
        dphiq += tl.dot(da.to(dtype), phik.to(dtype), input_precision=PRECISION)
    dq = dphiq * _dphi(q.to(tl.float32), FMAP)
    tl.store(dq_ptr + (bh * T + rt[:, None]) * D + rk[None, :], dq.to(dq_ptr.dtype.element_ty), mask=row_k)


@triton.jit
def _grads_k(q_ptr, k_ptr, v_ptr, kp_ptr, rate_ptr, ds_ptr, dz_ptr, g_ptr, d_ptr, dk_ptr,
             T, NC, H, HS, HKV, D, DV,
             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
             stride_kpb,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr, PADDED: tl.constexpr,
             DECAY: tl.constexpr, CAUSAL: tl.constexpr, Z: tl.constexpr, PRECISION: tl.constexpr):
    """One query head's share of dk of one chunk (all value columns): through G_c, and inside the chunk, whose
    score gradients are built as [keys, rows] (v·g̃ᵀ) so the dk product takes them untransposed. Without Z
    there is no δ, so no term through dz."""
    c, bh, b, h, kvh, t0, rt, rk, rv, row_k, row_v = _chunk(T, H, HKV, D, DV, BT, BK, BV)
    v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + rt[:, None] * stride_vt + rv[None, :], mask=row_v,
                other=0.0)
    dtype = v.dtype
    dstate = bh * NC + c if CAUSAL else bh
    gs = _state_tile(ds_ptr, dstate, rk, rv, D, DV)
    dphik = tl.dot(v.to(gs.dtype), tl.trans(gs), input_precision=PRECISION)  # through G_c
    if Z:
        dphik += tl.load(dz_ptr + dstate * D + rk, mask=rk < D, other=0.0)[None, :]
    rate = 0.0
    if DECAY:
        rate = tl.load(rate_ptr + h).to(tl.float32)
        dphik = dphik * _key_decay(rate, T, t0, BT)[:, None]
    if CAUSAL:
        _, phiq = _query_features(q_ptr, b, h, rt, rk, row_k, stride_qb, stride_qh, stride_qt, FMAP)
        g = tl.load(g_ptr + (bh * T + rt[:, None]) * DV + rv[None, :], mask=row_v, other=0.0).to(dtype)
        dat = tl.dot(v, tl.trans(g), input_precision=PRECISION)  # [keys, rows]
        if Z:
            dat += tl.load(d_ptr + bh * T + rt, mask=rt < T, other=0.0)[None, :]
        dat = _intra(dat, rate, BT, DECAY, True)
        dphik += tl.dot(dat.to(dtype), phiq, input_precision=PRECISION)
    k, _, inside = _load_keys(k_ptr, kp_ptr, b, kvh, t0, T, stride_kb, stride_kh, stride_kt, stride_kpb, D,
                              BT, BK, FMAP, PADDED)
    dk = tl.where(inside[:, None], dphik * _dphi(k, FMAP), 0.0)
    tl.store(dk_ptr + (bh * T + rt[:, None]) * D + rk[None, :], dk.to(dk_ptr.dtype.element_ty), mask=row_k)


@triton.jit
def _grads_v(q_ptr, k_ptr, kp_ptr, rate_ptr, ds_ptr, g_ptr, dv_ptr,
             T, NC, H, HS, HKV, D, DV,
             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_kpb,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr, PADDED: tl.constexpr,
             DECAY: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One query head's share of dv of one chunk (all value columns): through G_c, and inside the chunk, whose
    weights are built as [keys, rows] (φ(k)·φ(q)ᵀ) so the dv product takes them untransposed."""
    c, bh, b, h, kvh, t0, rt, rk, rv, row_k, row_v = _chunk(T, H, HKV, D, DV, BT, BK, BV)
    _, phik, _ = _load_keys(k_ptr, kp_ptr, b, kvh, t0, T, stride_kb, stride_kh, stride_kt, stride_kpb, D,
                            BT, BK, FMAP, PADDED)
    dstate = bh * NC + c if CAUSAL else bh
    gs = _state_tile(ds_ptr, dstate, rk, rv, D, DV)
    dtype = gs.dtype
    dv = tl.dot(phik.to(dtype), gs, input_precision=PRECISION)  # through G_c
    rate = 0.0
    if DECAY:
        rate = tl.load(rate_ptr + h).to(tl.float32)
        dv = dv * _key_decay(rate, T, t0, BT)[:, None]
    if CAUSAL:
        q, phiq = _query_features(q_ptr, b, h, rt, rk, row_k, stride_qb, stride_qh, stride_qt, FMAP)
        g = tl.load(g_ptr + (bh * T + rt[:, None]) * DV + rv[None, :], mask=row_v, other=0.0).to(q.dtype)
        at = tl.dot(phik.to(q.dtype), tl.trans(phiq), input_precision=PRECISION)  # [keys, rows]
        at = _intra(at, rate, BT, DECAY, True)
        dv += tl.dot(at.to(q.dtype), g, input_precision=PRECISION)
    tl.store(dv_ptr + (bh * T + rt[:, None]) * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=row_v)


@triton.jit
def _normalized(do_ptr, o_ptr, den_ptr, dden_ptr, g_ptr, d_ptr, T, H, DV, eps,
                stride_dob, stride_doh, stride_dot, stride_ob, stride_oh, stride_ot,
                BT: tl.constexpr, BV: tl.constexpr, HAS_DDEN: tl.constexpr):
    """The backward of o = num / (den + eps) for BT rows of one head, in one pass over dO and o:
    g̃ = dO / (den + eps) (in g's dtype) and δ = ∂L/∂den - (dO·o) / (den + eps)."""
    pt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rt = pt * BT + tl.arange(0, BT)
    rv = tl.arange(0, BV)
    rows = rt < T
    mask = rows[:, None] & (rv[None, :] < DV)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rt[:, None] * stride_dot + rv[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rt[:, None] * stride_ot + rv[None, :], mask=mask,
                other=0.0).to(tl.float32)
    r = 1.0 / (tl.load(den_ptr + bh * T + rt, mask=rows, other=0.0) + eps)
    d = -tl.sum(do * o, axis=1) * r
    if HAS_DDEN:
        d += tl.load(dden_ptr + bh * T + rt, mask=rows, other=0.0)
    tl.store(g_ptr + (bh * T + rt[:, None]) * DV + rv[None, :], (do * r[:, None]).to(g_ptr.dtype.element_ty),
             mask=mask)
    tl.store(d_ptr + bh * T + rt, d, mask=rows)


@dataclass(frozen=True)
class Config:
    """Launch parameters. The scans (_states, _dstates) split the [D, Dv] state into blocks of at most
    bk x bv, so that many sequential scans run at once; _output's programs own at most output_bv value
    columns; the three gradient kernels own all of them."""

    states_bk: int
    states_bv: int
    states_warps: int
    states_stages: int
    dstates_bk: int
    dstates_bv: int
    dstates_warps: int
    dstates_stages: int
    output_bv: int
    output_warps: int
    output_stages: int
    grads_warps: int
    grads_stages: int


_INTERPRETER_CONFIG = Config(64, 32, 4, 1, 64, 32, 4, 1, 64, 4, 1, 4, 1)
_GPU_CONFIG = Config(64, 32, 4, 3, 64, 32, 4, 3, 64, 4, 3, 8, 3)  # the gradient kernels spill at 4 warps


def config() -> Config:
    """The launch parameters (``ATTNCC_LINEAR_CONFIG``, a JSON list of Config's 13 fields, overrides them)."""
    return launch.tiles("ATTNCC_LINEAR_CONFIG", Config, _INTERPRETER_CONFIG, _GPU_CONFIG)


def _blocks(D: int, DV: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))



def _rates(decay, device):
    if decay is None:
        return torch.zeros(1, device=device, dtype=torch.float32), False
    return decay.to(device=device, dtype=torch.float32).contiguous(), True



def _nothing(like: torch.Tensor) -> torch.Tensor:
    """An empty fp32 tensor: a buffer no kernel reads or writes (a fresh one each time: op outputs must not alias)."""
    return like.new_empty(0, dtype=torch.float32)


def linear_fwd(q, k, v, *, key_padding=None, decay=None, causal: bool, feature_map: str, normalize: bool,
               eps: float, out_dtype: torch.dtype | None = None, initial_state=None, with_den: bool = True):
    """(o [B, H, T, Dv], den [B, H, T] fp32, states, final state (S [B, HS, D, Dv] fp32, z [B, HS, D])).

    `states` is (S_c, z_c) per chunk for the backward (causal), or the final state (bidirectional).
    q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]; the last dim of each must be contiguous.
    Without `with_den` (and without normalize), nothing computes the normalizer: den and z are empty
    tensors (and the final z None).
    """
    B, H, T, D = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"linear kernel: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cfg = config()
    BK, BVS = _blocks(D, DV)
    BV = min(BVS, cfg.output_bv)
    NC = triton.cdiv(T, CHUNK)
    kp, stride_kpb, padded = launch.key_padding(key_padding, k)
    rates, has_decay = _rates(decay, q.device)
    HS = H if has_decay else HKV
    precision = launch.dot_precision(q.dtype)
    state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    z_wanted = with_den or normalize or initial_state is not None
    chunk_states = launch.alloc((B, HS, NC, D, DV), state_dtype, q.device) if causal else q.new_empty(0)
    chunk_z = launch.alloc((B, HS, NC, D), torch.float32, q.device) if causal and z_wanted else _nothing(q)
    final_s = launch.alloc((B, HS, D, DV), torch.float32, q.device)
    final_z = launch.alloc((B, HS, D), torch.float32, q.device) if z_wanted else _nothing(q)
    initial = initial_state is not None
    s0, z0 = initial_state if initial else (final_s, final_z)
    bk_scan, bv_scan = min(BK, cfg.states_bk), min(BVS, cfg.states_bv)
    scan = dict(BT=CHUNK, BK=bk_scan, BV=bv_scan, FMAP=FEATURE_MAPS.index(feature_map), PADDED=padded,
                DECAY=has_decay, STORE_CHUNKS=causal, INITIAL=initial, PRECISION=precision,
                num_warps=cfg.states_warps, num_stages=cfg.states_stages)
    args = (k, v, kp, rates, chunk_states, chunk_z, final_s, final_z, s0.contiguous(), z0.contiguous(),
            T, NC, HS, HKV, D, DV, *launch.strides(k), *launch.strides(v), stride_kpb)
    _states[(triton.cdiv(DV, bv_scan), triton.cdiv(D, bk_scan), B * HS)](*args, S_PART=True, Z=False, **scan)
    if z_wanted:
        _states[(1, triton.cdiv(D, bk_scan), B * HS)](*args, S_PART=False, Z=True, **scan)
    o = launch.alloc((B, H, T, DV), out_dtype or q.dtype, q.device)
    den = launch.alloc((B, H, T), torch.float32, q.device) if z_wanted else _nothing(q)
    states = (chunk_states, chunk_z) if causal else (final_s.to(state_dtype), final_z)
    _output[(triton.cdiv(DV, BV), NC, B * H)](
        q, k, v, kp, rates, states[0], states[1], o, den, T, NC, H, HS, HKV, D, DV, float(eps),
        *launch.strides(q), *launch.strides(k), *launch.strides(v), stride_kpb,
        BT=CHUNK, BK=BK, BV=BV, FMAP=FEATURE_MAPS.index(feature_map), PADDED=padded, DECAY=has_decay,
        CAUSAL=causal, NORMALIZE=normalize, Z=z_wanted, PRECISION=precision, num_warps=cfg.output_warps,
        num_stages=cfg.output_stages)
    return o, den, states, (final_s, final_z if z_wanted else None)


def normalized_grads(do, o, den, dden, eps: float, g_dtype: torch.dtype):
    """(g̃, δ) of the normalized form o = num / (den + eps) (see the module docstring), by `_normalized`:
    dO [B, H, T, Dv] and o, den [B, H, T] fp32, ∂L/∂den or None; g̃ in g_dtype, δ fp32."""
    B, H, T, DV = do.shape
    do, o = (x if x.stride(-1) == 1 else x.contiguous() for x in (do, o))
    den = den.float().contiguous()
    dden = dden.float().contiguous() if dden is not None else den
    g = launch.alloc((B, H, T, DV), g_dtype, do.device)
    d = launch.alloc((B, H, T), torch.float32, do.device)
    _normalized[(triton.cdiv(T, CHUNK), B * H)](
        do, o, den, dden, g, d, T, H, DV, float(eps), *launch.strides(do), *launch.strides(o),
        BT=CHUNK, BV=max(16, triton.next_power_of_2(DV)), HAS_DDEN=dden is not den)
    return g, d


def linear_bwd(g, d, q, k, v, states, *, key_padding=None, decay=None, causal: bool, feature_map: str):
    """(dq, dk, dv) from g̃ = ∂L/∂num [B, H, T, Dv] and δ = ∂L/∂den [B, H, T] (see the module docstring);
    δ None: nothing reads den, and the normalizer's terms are skipped (states' z_c may then be empty)."""
    B, H, T, D = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cfg = config()
    BK, BV = _blocks(D, DV)
    NC = triton.cdiv(T, CHUNK)
    kp, stride_kpb, padded = launch.key_padding(key_padding, k)
    rates, has_decay = _rates(decay, q.device)
    HS = H if has_decay else HKV
    precision = launch.dot_precision(q.dtype)
    state_dtype = states[0].dtype
    g = g.to(state_dtype).contiguous()
    with_den = d is not None
    d = d.float().contiguous() if with_den else g
    n_states = NC if causal else 1
    dstates = launch.alloc((B, H, n_states, D, DV), state_dtype, q.device)
    dz = launch.alloc((B, H, n_states, D), torch.float32, q.device) if with_den else g
    bk_scan, bv_scan = min(BK, cfg.dstates_bk), min(BV, cfg.dstates_bv)
    scan = dict(BT=CHUNK, BK=bk_scan, BV=bv_scan, FMAP=FEATURE_MAPS.index(feature_map), DECAY=has_decay,
                CAUSAL=causal, PRECISION=precision, num_warps=cfg.dstates_warps, num_stages=cfg.dstates_stages)
    args = (q, g, d, rates, dstates, dz, T, NC, H, D, DV, *launch.strides(q))
    _dstates[(triton.cdiv(DV, bv_scan), triton.cdiv(D, bk_scan), B * H)](*args, G_PART=True, Z=False, **scan)
    if with_den:
        _dstates[(1, triton.cdiv(D, bk_scan), B * H)](*args, G_PART=False, Z=True, **scan)
    group = H // HKV
    kv_dtype = torch.float32 if group > 1 else k.dtype  # per query head: a GQA group sums them in fp32 below
    dq = launch.alloc((B, H, T, D), q.dtype, q.device)
    dk = launch.alloc((B, H, T, D), kv_dtype, q.device)
    dv = launch.alloc((B, H, T, DV), kv_dtype, q.device)
    strides = (*launch.strides(q), *launch.strides(k), *launch.strides(v), stride_kpb)
    constants = dict(BT=CHUNK, BK=BK, BV=BV, FMAP=FEATURE_MAPS.index(feature_map), PADDED=padded, DECAY=has_decay,
                     CAUSAL=causal, Z=with_den, PRECISION=precision, num_warps=cfg.grads_warps,
                     num_stages=cfg.grads_stages)
    _grads_q[(NC, B * H)](q, k, v, kp, rates, states[0], states[1], g, d, dq, T, NC, H, HS, HKV, D, DV, *strides,
                          **constants)
    _grads_k[(NC, B * H)](q, k, v, kp, rates, dstates, dz, g, d, dk, T, NC, H, HS, HKV, D, DV, *strides,
                          **constants)
    constants.pop("Z")
    _grads_v[(NC, B * H)](q, k, kp, rates, dstates, g, dv, T, NC, H, HS, HKV, D, DV, *launch.strides(q),
                          *launch.strides(k), stride_kpb, **constants)
    if group > 1:
        dk = dk.view(B, HKV, group, T, D).sum(2)
        dv = dv.view(B, HKV, group, T, DV).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
