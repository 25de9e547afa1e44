"""Linear attention reference: Katharopoulos (VARIANTS.md §2), Based's Taylor map (§3.1) and
Lightning Attention's per-head decay (§4).

Without decay (§2.1):
    o_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps),  S_i = Σ_{j∈A_i} φ(k_j) v_jᵀ,  z_i = Σ_{j∈A_i} φ(k_j),
where A_i is j <= i (causal) or every key (bidirectional), minus padded keys (their φ(k) is zeroed).

With decay (§4.1), λ_h = exp(-s_h) per query head, causal only:
    o_t = Σ_{s≤t} λ^{t−s} (φ(q_t)·φ(k_s)) v_s,
and ``normalize=True`` divides by the same decayed sum, Σ_{s≤t} λ^{t−s} φ(q_t)·φ(k_s) + eps, so the
output is a decay-weighted average of values (λ = 1 recovers §2.1). Lightning itself uses
``normalize=False`` and normalizes the output instead (§4.1 "NormAttention").

Causal inputs are processed in chunks (§2.4; with decay the Lightning-2 intra/inter split of §4.5),
bidirectional ones with one global state. Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.codegen.masks import causal_offset, prepare_qkv


def _elu1(x: Tensor) -> Tensor:
    return F.elu(x) + 1


def _identity(x: Tensor) -> Tensor:
    return x


def _taylor2(x: Tensor) -> Tensor:
    d = x.shape[-1]
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([ones, x / d**0.25, outer / math.sqrt(2 * d)], dim=-1)


_FEATURE_MAPS = {"elu1": _elu1, "relu": F.relu, "identity": _identity, "taylor2": _taylor2}


def feature_dim(name: str, head_dim: int) -> int:
    """The size of φ(x) for x of size head_dim."""
    return 1 + head_dim + head_dim**2 if name == "taylor2" else head_dim


def feature_map(x: Tensor, name: str) -> Tensor:
    """Apply the feature map ``name`` row-wise over the last axis.

    elu1: elu(x) + 1 (§2.1). relu, identity: as named. taylor2: Based's 2nd-order Taylor map (§3.1)
    with d' = D, φ(x) = [1, x / D^{1/4}, vec(x xᵀ) / √(2D)] of size 1 + D + D², so that
    φ(q)·φ(k) = 1 + s + s²/2 with s = q·k / √D.
    """
    if name not in _FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; expected one of {sorted(_FEATURE_MAPS)}")
    return _FEATURE_MAPS[name](x)


def _alibi_slopes(heads: int) -> list[float]:
    if math.log2(heads).is_integer():
        start = 2.0 ** (-8.0 / heads)
        return [start**h for h in range(1, heads + 1)]
    closest = 2 ** math.floor(math.log2(heads))
    return _alibi_slopes(closest) + _alibi_slopes(2 * closest)[0::2][: heads - closest]


def lightning_decay_rates(heads: int, layer: int, num_layers: int) -> Tensor:
    """Per-head decay rates s_h (λ_h = exp(-s_h)) of TNL / Lightning, code convention of §4.2.

    s_h = slope_h · (1 − layer / (num_layers − 1) + 1e−5), slope_h the ALiBi slopes 2^{−8h/H}
    (h = 1..H, with ALiBi's interleaving fallback when H is not a power of two), layer 0-indexed.
    A single-layer model (num_layers = 1) uses layer / (num_layers − 1) = 0.
    """
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if num_layers < 1 or not 0 <= layer < num_layers:
        raise ValueError(f"need 0 <= layer < num_layers, got layer={layer}, num_layers={num_layers}")
    depth = layer / (num_layers - 1) if num_layers > 1 else 0.0
    return torch.tensor([slope * (1 - depth + 1e-5) for slope in _alibi_slopes(heads)], dtype=torch.float32)


def constant_decay_rates(heads: int, lam: float) -> Tensor:
    """The same decay λ for every head, as rates s = -log λ; λ must lie in (0, 1]."""
    if not 0 < lam <= 1:
        raise ValueError(f"decay lam must lie in (0, 1], got {lam}")
    return torch.full((heads,), math.log(1 / lam), dtype=torch.float32)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    feature_map: str = "elu1",
    normalize: bool = True,
    decay: Tensor | None = None,
    eps: float = 1e-6,
    key_padding: Tensor | None = None,
    chunk: int = 64,
) -> Tensor:
    """Linear attention (§2.1, §3.1, §4.1); see the module docstring for the exact formula.

    q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] -> [B, H, Tq, Dv] in q's dtype.
    ``decay`` is a rate tensor [H] (λ_h = exp(-s_h), s_h >= 0; see ``lightning_decay_rates``) and
    needs ``causal=True``. ``key_padding`` is bool [B, Tk], True = real token. Causal queries end the
    key sequence (masks.py: query i is position Tk - Tq + i). A query with no visible key (causal,
    left padding) outputs 0.
    """
    if feature_map not in _FEATURE_MAPS:
        raise ValueError(f"unknown feature map {feature_map!r}; expected one of {sorted(_FEATURE_MAPS)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if decay is not None and not causal:
        raise ValueError(
            "decay is only defined for causal linear attention (§4.1 sums over s <= t); pass causal=True"
        )
    out_dtype = q.dtype
    phi = _FEATURE_MAPS[feature_map]
    q, k, v = prepare_qkv(q, k, v, key_padding)
    q, k = phi(q), phi(k)
    if key_padding is not None:
        k = k * key_padding[:, None, :, None]
    if causal and q.shape[-2] != k.shape[-2]:
        out = _causal_at_end(q, k, v, _rates(decay, q.shape[1], q.device), normalize, eps)
    elif causal:
        out, _ = _causal_chunked(q, k, v, _rates(decay, q.shape[1], q.device), normalize, eps, chunk)
    else:
        out = _bidirectional(q, k, v, normalize, eps)
    return out.to(out_dtype)


def _rates(decay: Tensor | None, heads: int, device: torch.device) -> Tensor:
    if decay is None:
        return torch.zeros(heads, device=device)
    if tuple(decay.shape) != (heads,):
        raise ValueError(
            f"decay must be a rate tensor of shape ({heads},) (one per query head), got {tuple(decay.shape)}"
        )
    if not torch.compiler.is_compiling() and _any_negative(decay):
        raise ValueError("decay rates s must be >= 0 (λ = exp(-s) must lie in (0, 1])")
    return decay.to(device=device, dtype=torch.float32)


def _any_negative(decay: Tensor) -> bool:
    try:
        return bool((decay < 0).any())
    except Exception:  # traced (fake or functional tensors): the value is unknown here
        return False


def _bidirectional(q: Tensor, k: Tensor, v: Tensor, normalize: bool, eps: float) -> Tensor:
    num = q @ (k.mT @ v)
    if not normalize:
        return num
    den = q @ k.sum(dim=-2).unsqueeze(-1)
    return num / (den + eps)


def _causal_at_end(q: Tensor, k: Tensor, v: Tensor, rates: Tensor, normalize: bool, eps: float) -> Tensor:
    """Queries that end a longer key sequence (query i at position p_i = Tk - Tq + i), in the quadratic
    form: O_i = Σ_{j<=p_i} λ^{p_i-j} (φ(q_i)·φ(k_j)) v_j, normalized by the same sum without v_j.
    O(Tq·Tk·D): a decode step reads each key once, instead of a chunked pass over all Tk positions."""
    tq, tk = q.shape[-2], k.shape[-2]
    lag = torch.arange(causal_offset(tq, tk), tk, device=q.device).view(-1, 1) - torch.arange(tk, device=q.device)
    s = rates.view(1, -1, 1, 1)
    scores = (q @ k.mT) * torch.where(lag >= 0, torch.exp(-s * lag.clamp(min=0)), 0.0)
    num = scores @ v
    if not normalize:
        return num
    return num / (scores.sum(dim=-1, keepdim=True) + eps)


def causal_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, Tensor] | None,
    *,
    feature_map: str = "elu1",
    normalize: bool = True,
    decay: Tensor | None = None,
    eps: float = 1e-6,
    key_padding: Tensor | None = None,
    chunk: int = 64,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention of queries aligned with their keys, continuing the sums of every
    earlier key: the recurrent form a decode step runs (and, from state None, a whole prefill).

    state is (S [B, H, F, Dv], z [B, H, F, 1]) float32: S = Σ_{s<t0} λ^{t0-1-s} φ(k_s) v_sᵀ, z the same
    sum of φ(k_s), over every key before this block (t0 its first position), per query head; None =
    no earlier key. Returns (out [B, H, T, Dv] in q's dtype, the state after the block's last key).
    Chained over consecutive blocks it equals ``linear_attention`` over the whole sequence.
    """
    phi = _FEATURE_MAPS[feature_map]
    out_dtype = q.dtype
    q, k, v = prepare_qkv(q, k, v, key_padding)
    q, k = phi(q), phi(k)
    if key_padding is not None:
        k = k * key_padding[:, None, :, None]
    out, state = _causal_chunked(q, k, v, _rates(decay, q.shape[1], q.device), normalize, eps, chunk, state)
    return out.to(out_dtype), state


def _causal_chunked(
    q: Tensor, k: Tensor, v: Tensor, rates: Tensor, normalize: bool, eps: float, chunk: int,
    state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """§2.4 chunked form with §4.5's decay split, 0-indexed offsets r, c inside a chunk of length n:
        O = [(Q Kᵀ) ⊙ M] V + diag(λ^{r+1}) Q KV,  M_rc = λ^{r−c} (r >= c) else 0,
        KV <- λ^n KV + (diag(λ^{n−1−r}) K)ᵀ V,
    and the same recursion for the normalizer with V replaced by ones."""
    B, H, T, features = q.shape
    s = rates.view(1, H, 1, 1)
    kv, kz = state if state is not None else (q.new_zeros(B, H, features, v.shape[-1]), q.new_zeros(B, H, features, 1))
    outs = []
    for start in range(0, T, chunk):
        rows = slice(start, start + chunk)
        qc, kc, vc = q[:, :, rows], k[:, :, rows], v[:, :, rows]
        n = qc.shape[2]
        r = torch.arange(n, device=q.device)
        lag = r.view(-1, 1) - r.view(1, -1)
        intra_decay = torch.where(lag >= 0, torch.exp(-s * lag.clamp(min=0)), 0.0)
        q_decay = torch.exp(-s * (r + 1).view(-1, 1))
        k_decay = torch.exp(-s * (n - 1 - r).view(-1, 1))
        chunk_decay = torch.exp(-s * n)
        scores = (qc @ kc.mT) * intra_decay
        num = scores @ vc + q_decay * (qc @ kv)
        if normalize:
            den = scores.sum(dim=-1, keepdim=True) + q_decay * (qc @ kz)
            num = num / (den + eps)
        outs.append(num)
        kv = chunk_decay * kv + (k_decay * kc).mT @ vc
        kz = chunk_decay * kz + (k_decay * kc).sum(dim=-2).unsqueeze(-1)
    return torch.cat(outs, dim=2), (kv, kz)
