"""The AttnRes aggregation (VARIANTS.md §9.1, §9.4) as one fused Triton kernel, forward and backward.

Per token, over S sources v_i ∈ R^d with the query w and the key-norm weight g (c = w ⊙ g):

    r_i = 1 / sqrt(mean(v_i²) + eps),   x̂_i = r_i v_i,   ℓ_i = c · x̂_i   (= w · RMSNorm_g(v_i))
    p = softmax_i(ℓ),   o = Σ_i p_i v_i

Backward, with do = ∂L/∂o: ∂L/∂p_i = do · v_i =: dp_i, the softmax gives dℓ_i = p_i (dp_i - Σ_j p_j dp_j),
and ∂ℓ_i/∂v_i = r_i c + (c · v_i) ∂r_i/∂v_i with ∂r_i/∂v_i = -r_i³ v_i / d, i.e. r_i (c - x̂_i ℓ_i / d), so

    dv_i = p_i do + dℓ_i r_i (c - x̂_i ℓ_i / d)
    u = Σ_{tokens, i} dℓ_i x̂_i,   dw = u ⊙ g,   dg = u ⊙ w

(checked against autograd of reference.attnres in tests/test_attnres_kernel.py).

Layout: the sources are stacked into one contiguous [S, N, d] tensor (N = tokens, every leading dim
flattened), which costs one copy of the sources (the backward stacks them again rather than keeping
the stacked copy alive: Full AttnRes would otherwise hold a copy of every source per aggregation).
Triton has no arrays of pointers: a list would need either one kernel argument per source (a signature
per S, and S grows to 2L + 1 in Full AttnRes) or a device table of addresses built on every call (a
host-to-device copy, which CUDA graphs cannot capture). The backward writes dv stacked too; the op
hands back views of it (`unbind`), so that direction costs nothing extra.

Kernels, specialized on S (tl.constexpr; SP = next power of two, sources past S masked), the block of
d (BD) and the block of tokens (BN); every program owns BN tokens and loads [SP, BN, BD] tiles:

    _attnres_fwd  grid (N / BN): sweep 1 over d: Σ v_i², Σ v_i c -> r, ℓ, p (softmax over SP in
                  registers); stores r, p ([S, N] fp32, what the backward needs); sweep 2 writes o
    _attnres_bwd  grid (N / BN): sweep 1: dp_i = do·v_i and c·v_i (ℓ = r (c·v)); dℓ; sweep 2 writes
                  dv_i and this program's partial u ([programs, d] fp32, summed in PyTorch)

fp32 math inside; o and dv in the sources' dtype, dw and dg in the query's and the weight's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attncc.codegen import launch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE = 4096  # elements of one [SP, BN, BD] tile (fp32: 32 registers a thread at 4 warps)
MAX_BLOCK_D = 128
MAX_BLOCK_N = 64



def blocks(S: int, N: int, D: int) -> tuple[int, int, int]:
    """(SP, BN, BD): the padded number of sources, the block of tokens and the block of d."""
    SP = triton.next_power_of_2(S)
    BD = min(triton.next_power_of_2(D), MAX_BLOCK_D, max(16, TILE // SP))
    BN = max(1, min(TILE // (SP * BD), MAX_BLOCK_N, triton.next_power_of_2(N)))
    return SP, BN, BD


@triton.jit
def _tile(v_ptr, rs, rn, k0, S, N, D, BD: tl.constexpr):
    """The [SP, BN, BD] tile of the stacked sources at d offset k0 (fp32, zero outside), its d offsets."""
    rk = k0 + tl.arange(0, BD)
    offs = (rs[:, None, None] * N + rn[None, :, None]) * D + rk[None, None, :]
    mask = (rs[:, None, None] < S) & (rn[None, :, None] < N) & (rk[None, None, :] < D)
    return tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask, rk


@triton.jit
def _attnres_fwd(v_ptr, w_ptr, g_ptr, o_ptr, r_ptr, p_ptr, N, D, eps,
                 S: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    rs = tl.arange(0, SP).to(tl.int64)
    rn = (pid * BN + tl.arange(0, BN)).to(tl.int64)
    ss = tl.zeros((SP, BN), dtype=tl.float32)
    dot = tl.zeros((SP, BN), dtype=tl.float32)
    for k0 in range(0, D, BD):
        v, _, _, rk = _tile(v_ptr, rs, rn, k0, S, N, D, BD)
        c = tl.load(w_ptr + rk, mask=rk < D, other=0.0).to(tl.float32) * \
            tl.load(g_ptr + rk, mask=rk < D, other=0.0).to(tl.float32)
        ss += tl.sum(v * v, axis=2)
        dot += tl.sum(v * c[None, None, :], axis=2)
    r = 1.0 / tl.sqrt(ss / D + eps)
    logits = tl.where(rs[:, None] < S, r * dot, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    p = e / tl.sum(e, axis=0)[None, :]
    saved = rs[:, None] * N + rn[None, :]
    inside = (rs[:, None] < S) & (rn[None, :] < N)
    tl.store(r_ptr + saved, r, mask=inside)
    tl.store(p_ptr + saved, p, mask=inside)
    for k0 in range(0, D, BD):
        v, _, _, rk = _tile(v_ptr, rs, rn, k0, S, N, D, BD)
        o = tl.sum(p[:, :, None] * v, axis=0)
        tl.store(o_ptr + rn[:, None] * D + rk[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=(rn[:, None] < N) & (rk[None, :] < D))


@triton.jit
def _attnres_bwd(v_ptr, w_ptr, g_ptr, do_ptr, r_ptr, p_ptr, dv_ptr, u_ptr, N, D,
                 S: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    rs = tl.arange(0, SP).to(tl.int64)
    rn = (pid * BN + tl.arange(0, BN)).to(tl.int64)
    saved = rs[:, None] * N + rn[None, :]
    inside = (rs[:, None] < S) & (rn[None, :] < N)
    r = tl.load(r_ptr + saved, mask=inside, other=0.0)
    p = tl.load(p_ptr + saved, mask=inside, other=0.0)
    dp = tl.zeros((SP, BN), dtype=tl.float32)
    dot = tl.zeros((SP, BN), dtype=tl.float32)
    for k0 in range(0, D, BD):
        v, _, _, rk = _tile(v_ptr, rs, rn, k0, S, N, D, BD)
        c = tl.load(w_ptr + rk, mask=rk < D, other=0.0).to(tl.float32) * \
            tl.load(g_ptr + rk, mask=rk < D, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + rn[:, None] * D + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < D),
                     other=0.0).to(tl.float32)
        dp += tl.sum(v * do[None, :, :], axis=2)
        dot += tl.sum(v * c[None, None, :], axis=2)
    dlogits = p * (dp - tl.sum(p * dp, axis=0)[None, :])
    coef = dlogits * r  # dℓ_i r_i
    proj = r * dot / D  # ℓ_i / d
    for k0 in range(0, D, BD):
        v, offs, mask, rk = _tile(v_ptr, rs, rn, k0, S, N, D, BD)
        c = tl.load(w_ptr + rk, mask=rk < D, other=0.0).to(tl.float32) * \
            tl.load(g_ptr + rk, mask=rk < D, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + rn[:, None] * D + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < D),
                     other=0.0).to(tl.float32)
        xhat = r[:, :, None] * v
        dv = p[:, :, None] * do[None, :, :] + coef[:, :, None] * (c[None, None, :] - xhat * proj[:, :, None])
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)
        u = tl.sum(tl.sum(dlogits[:, :, None] * xhat, axis=0), axis=0)
        tl.store(u_ptr + pid.to(tl.int64) * D + rk, u, mask=rk < D)


def attnres_fwd(values: torch.Tensor, query: torch.Tensor, norm_weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values: the stacked sources [S, N, d] (contiguous) -> o [N, d] (their dtype), r, p [S, N] fp32."""
    S, N, D = values.shape
    SP, BN, BD = blocks(S, N, D)
    o = launch.alloc((N, D), values.dtype, values.device)
    r = launch.alloc((S, N), torch.float32, values.device)
    p = launch.alloc((S, N), torch.float32, values.device)
    if N > 0:
        _attnres_fwd[(triton.cdiv(N, BN),)](values, query.contiguous(), norm_weight.contiguous(), o, r, p, N, D,
                                            float(eps), S=S, SP=SP, BN=BN, BD=BD)
    return o, r, p


def attnres_bwd(do: torch.Tensor, values: torch.Tensor, query: torch.Tensor, norm_weight: torch.Tensor,
                r: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """do [N, d], the stacked sources [S, N, d], r, p [S, N] -> (dv [S, N, d], dquery, dnorm_weight)."""
    S, N, D = values.shape
    SP, BN, BD = blocks(S, N, D)
    programs = triton.cdiv(N, BN)
    dv = launch.alloc((S, N, D), values.dtype, values.device)
    u = launch.alloc((programs, D), torch.float32, values.device)
    query, norm_weight = query.contiguous(), norm_weight.contiguous()
    if N > 0:
        _attnres_bwd[(programs,)](values, query, norm_weight, do.contiguous(), r, p, dv, u, N, D,
                                  S=S, SP=SP, BN=BN, BD=BD)
    u = u.sum(0)
    return dv, (u * norm_weight.float()).to(query.dtype), (u * query.float()).to(norm_weight.dtype)
