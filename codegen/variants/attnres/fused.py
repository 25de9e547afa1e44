"""The AttnRes aggregation (VARIANTS.md §9.1, §9.4) as one fused Triton kernel, forward and backward.

Per token, over S sources v_i ∈ R^d with the query w and the key-norm weight g (c = w ⊙ g):

    r_i = 1 / sqrt(mean(v_i²) + eps),   x̂_i = r_i v_i,   ℓ_i = c · x̂_i   (= w · RMSNorm_g(v_i))
    p = softmax_i(ℓ),   o = Σ_i p_i v_i

Backward, with do = ∂L/∂o: ∂L/∂p_i = do · v_i =: dp_i, the softmax gives dℓ_i = p_i (dp_i - Σ_j p_j dp_j),
and ∂ℓ_i/∂v_i = r_i c + (c · v_i) ∂r_i/∂v_i with ∂r_i/∂v_i = -r_i³ v_i / d, i.e. r_i (c - x̂_i ℓ_i / d), so

    dv_i = p_i do + dℓ_i r_i (c - x̂_i ℓ_i / d)
    u = Σ_{tokens, i} dℓ_i x̂_i,   dw = u ⊙ g,   dg = u ⊙ w

(checked against autograd of reference.attnres in tests/test_attnres_kernel.py).

Layout: the sources are passed as they are, a tuple of S contiguous [N, d] tensors (N = tokens,
every leading dim flattened; Triton takes a tuple argument as one pointer per element), so no copy of
the sources is ever made. A program picks the BL sources of one step out of the tuple with a select
over its S pointers, so the loops over sources are ordinary loops (not unrolled: S reaches 2L + 1 in
Full AttnRes). The backward writes dv stacked, [S, N, d]; the op hands back views of it (`unbind`).

One token's whole row (d <= MAX_D) is one block of registers:

    _attnres_fwd  grid (N): over the sources, BL at a time, each read once: Σ v_i², Σ v_i c -> r_i, ℓ_i,
                  and an online softmax over depth accumulates o = Σ p_i v_i (the flash-attention
                  update, over sources instead of keys). Stores o, r [S, N] and ℓ into p's buffer, then
                  rewrites it as p_i = exp(ℓ_i - lse) ([S, N] fp32: what the backward needs).
    _attnres_bwd  grid (P <= PROGRAMS, each looping over tokens): sweep 1 reads the sources for
                  Σ_j p_j dp_j (dp_j = do·v_j); sweep 2 reads them again (from L2: one token's sources)
                  for dℓ_i, dv_i and u, accumulated in registers; each program writes its own row of a
                  [P, d] fp32 buffer, summed in PyTorch.

fp32 math inside; o and dv in the sources' dtype, dw and dg in the query's and the weight's. The
launch configuration (BL, warps) is `config`'s; ATTNCC_ATTNRES_CONFIG='[BL, warps]' overrides it (the
benchmark's sweep).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from attncc.codegen import launch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_D = 16384  # the widest row a program holds in registers
PROGRAMS = 2048  # the backward's programs (each loops over tokens): bounds its [P, d] partial sums


def config(S: int, D: int, backward: bool) -> tuple[int, int]:
    """(BL, num_warps): sources per step and warps of a program. Measured on the H200 (bench/, d = 4096,
    S = 4..17): 4 warps a 4096-wide row; the forward steps 2 sources at a time (4 when S divides), the
    backward 4."""
    override = os.environ.get("ATTNCC_ATTNRES_CONFIG")
    if override:
        bl, warps = json.loads(override)
        return int(bl), int(warps)
    warps = max(1, min(16, triton.next_power_of_2(D) // 1024))
    return (4 if backward or S % 4 == 0 else 2), warps


@triton.jit
def _pick(vs, rl, S: tl.constexpr):
    """[BL] pointers: source rl[j] of the tuple vs (source 0 where rl >= S; those lanes are masked)."""
    ptr = vs[0] + rl.to(tl.int64) * 0
    for j in tl.static_range(1, S):
        ptr = tl.where(rl == j, vs[j], ptr)
    return ptr


@triton.jit
def _coef(w_ptr, g_ptr, rd, D: tl.constexpr):
    """c = w ⊙ g at the d offsets rd."""
    return tl.load(w_ptr + rd, mask=rd < D, other=0.0).to(tl.float32) * \
        tl.load(g_ptr + rd, mask=rd < D, other=0.0).to(tl.float32)


@triton.jit
def _rows(vs, n, rl, rd, S: tl.constexpr, D: tl.constexpr, EVICT: tl.constexpr):
    """The [BL, BD] rows of token n in sources rl (fp32, zero outside), and the lanes that are sources.
    EVICT: the L2 policy ("evict_last" where the backward reads them again)."""
    ml = rl < S
    ptrs = _pick(vs, rl, S)
    v = tl.load(ptrs[:, None] + (n * D + rd[None, :]), mask=ml[:, None] & (rd[None, :] < D), other=0.0,
                eviction_policy=EVICT)
    return v.to(tl.float32), ml


@triton.jit
def _attnres_fwd(vs, w_ptr, g_ptr, o_ptr, r_ptr, p_ptr, N, eps,
                 S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, BD)
    c = _coef(w_ptr, g_ptr, rd, D)
    m = tl.full((), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((), dtype=tl.float32)
    o = tl.zeros((BD,), dtype=tl.float32)
    for l0 in range(0, S, BL):
        rl = l0 + tl.arange(0, BL)
        v, ml = _rows(vs, n, rl, rd, S, D, "evict_first")
        r = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / D + eps)
        logit = tl.sum(v * c[None, :], axis=1) * r
        m_new = tl.maximum(m, tl.max(tl.where(ml, logit, float("-inf")), axis=0))
        e = tl.where(ml, tl.exp(logit - m_new), 0.0)
        alpha = tl.exp(m - m_new)
        acc = acc * alpha + tl.sum(e, axis=0)
        o = o * alpha + tl.sum(e[:, None] * v, axis=0)
        m = m_new
        tl.store(r_ptr + rl * N + n, r, mask=ml)
        tl.store(p_ptr + rl * N + n, logit, mask=ml)
    tl.store(o_ptr + n * D + rd, (o / acc).to(o_ptr.dtype.element_ty), mask=rd < D)
    lse = m + tl.log(acc)
    tl.debug_barrier()
    for l0 in range(0, S, BL):  # p's buffer holds ℓ: rewrite it as p
        rl = l0 + tl.arange(0, BL)
        logit = tl.load(p_ptr + rl * N + n, mask=rl < S, other=0.0)
        tl.store(p_ptr + rl * N + n, tl.exp(logit - lse), mask=rl < S)


@triton.jit
def _attnres_bwd(vs, w_ptr, g_ptr, do_ptr, r_ptr, p_ptr, dv_ptr, u_ptr, N,
                 S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    pid = tl.program_id(0)
    rd = tl.arange(0, BD)
    c = _coef(w_ptr, g_ptr, rd, D)
    u = tl.zeros((BD,), dtype=tl.float32)
    for t in range(pid, N, tl.num_programs(0)):
        n = tl.cast(t, tl.int64)
        do = tl.load(do_ptr + n * D + rd, mask=rd < D, other=0.0).to(tl.float32)
        pdp = tl.zeros((), dtype=tl.float32)  # Σ_j p_j dp_j
        for l0 in range(0, S, BL):
            rl = l0 + tl.arange(0, BL)
            v, ml = _rows(vs, n, rl, rd, S, D, "evict_last")
            p = tl.load(p_ptr + rl * N + n, mask=ml, other=0.0)
            pdp += tl.sum(p * tl.sum(v * do[None, :], axis=1), axis=0)
        for l0 in range(0, S, BL):
            rl = l0 + tl.arange(0, BL)
            v, ml = _rows(vs, n, rl, rd, S, D, "evict_first")
            p = tl.load(p_ptr + rl * N + n, mask=ml, other=0.0)
            r = tl.load(r_ptr + rl * N + n, mask=ml, other=0.0)
            dl = p * (tl.sum(v * do[None, :], axis=1) - pdp)  # dℓ_i
            xhat = r[:, None] * v
            proj = tl.sum(xhat * c[None, :], axis=1) / D  # ℓ_i / d
            dv = p[:, None] * do[None, :] + (dl * r)[:, None] * (c[None, :] - xhat * proj[:, None])
            tl.store(dv_ptr + (rl[:, None] * N + n) * D + rd[None, :], dv.to(dv_ptr.dtype.element_ty),
                     mask=ml[:, None] & (rd[None, :] < D))
            u += tl.sum(dl[:, None] * xhat, axis=0)
    tl.store(u_ptr + pid.to(tl.int64) * D + rd, u, mask=rd < D)


def _flat(sources) -> tuple[torch.Tensor, ...]:
    """Each source as a contiguous [N, d] tensor (a view when it already is one)."""
    d = sources[0].shape[-1]
    return tuple(s.reshape(-1, d).contiguous() for s in sources)


def attnres_fwd(sources, query: torch.Tensor, norm_weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S sources of one shape [..., d] (d <= MAX_D) -> o [N, d] (their dtype), r, p [S, N] fp32 (N: the
    leading dims)."""
    vs = _flat(sources)
    S, (N, D) = len(vs), vs[0].shape
    BL, warps = config(S, D, backward=False)
    device = vs[0].device
    o = launch.alloc((N, D), vs[0].dtype, device)
    r = launch.alloc((S, N), torch.float32, device)
    p = launch.alloc((S, N), torch.float32, device)
    if N > 0:
        _attnres_fwd[(N,)](vs, query.contiguous(), norm_weight.contiguous(), o, r, p, N, float(eps), S=S, D=D,
                           BD=triton.next_power_of_2(D), BL=BL, num_warps=warps)
    return o, r, p


def attnres_bwd(do: torch.Tensor, sources, query: torch.Tensor, norm_weight: torch.Tensor,
                r: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """do [..., d], the S sources, r, p [S, ...] -> (dv [S, N, d], dquery, dnorm_weight)."""
    vs = _flat(sources)
    S, (N, D) = len(vs), vs[0].shape
    BL, warps = config(S, D, backward=True)
    programs = max(1, min(N, PROGRAMS))
    device = vs[0].device
    dv = launch.alloc((S, N, D), vs[0].dtype, device)
    u = launch.alloc((programs, D), torch.float32, device)
    query, norm_weight = query.contiguous(), norm_weight.contiguous()
    if N > 0:
        _attnres_bwd[(programs,)](vs, query, norm_weight, do.reshape(N, D).contiguous(), r.reshape(S, N).contiguous(),
                                  p.reshape(S, N).contiguous(), dv, u, N, S=S, D=D, BD=triton.next_power_of_2(D),
                                  BL=BL, num_warps=warps)
        u = u.sum(0)
    else:
        u = torch.zeros(D, dtype=torch.float32, device=device)
    return dv, (u * norm_weight.float()).to(query.dtype), (u * query.float()).to(norm_weight.dtype)
