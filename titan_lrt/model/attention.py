"""Attention kernels for the three pass kinds: full causal, subset, and decode.

Layouts: queries (B, H, n, D); keys and values (B, Hkv, m, D) with H a multiple
of Hkv (grouped-query attention).

The subset pass (DESIGN 2.4) is the interesting one. Its queries are the
positions P_i = {t : t mod S == i}; the buffer's keys are grouped the same way,
group j holding the positions j, j + S, j + 2S, ... Between query a of group i
(position i + aS) and key b of group j (position j + bS) the causal rule
"key position <= query position" becomes

    b <= a        if j <= i      ("inclusive" block),
    b <= a - 1    if j > i       ("strict" block),

so every (query group, key group) pair is an ordinary causal block on the
strided index. Attending group by group with a causal kernel and merging the
partial softmaxes by their log-sum-exp costs, over the S passes, exactly one
causal attention, never touches masked-out key blocks, and needs no copy of the
buffer.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from titan_lrt.model.args import ATTENTION_BACKENDS


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int = 0, backend: str = "auto") -> Tensor:
    """Full causal self-attention (optionally with a sliding window)."""
    if window > 0 and _use_flex(backend, q):
        n = q.size(2)
        mask = _block_mask("causal", n, n, 1, 0, window, q.device)
        return _flex(q, k.to(q.dtype), v.to(q.dtype), mask)
    k, v = _expand_kv(k.to(q.dtype), v.to(q.dtype), q.size(1))
    if window <= 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    pos = torch.arange(q.size(2), device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(pos, pos, window))


def subset_attention(
    q: Tensor, keys: list[Tensor], values: list[Tensor], index: int, window: int = 0, backend: str = "auto"
) -> Tensor:
    """Queries of group `index` attend to the key groups 0..S-1 of the buffer.

    keys[j] / values[j] hold group j (length ceil((T - j) / S)); group `index`
    must already hold the fresh keys of these queries.
    """
    S = len(keys)
    n = q.size(2)
    if _use_flex(backend, q):
        T = sum(k.size(2) for k in keys)
        mask = _block_mask("subset", n, T, S, index, window, q.device)
        return _flex(q, torch.cat(keys, dim=2).to(q.dtype), torch.cat(values, dim=2).to(q.dtype), mask)
    k_blocks, v_blocks, shifts, groups = [], [], [], []
    for j in range(S):
        shift = 0 if j <= index else 1
        if n - shift <= 0:
            continue
        k, v = (t[:, :, : n - shift].to(q.dtype) for t in (keys[j], values[j]))  # one dtype (autocast, float8)
        k, v = _expand_kv(k, v, q.size(1))
        k_blocks.append(k)
        v_blocks.append(v)
        shifts.append(shift)
        groups.append(j)
    if window <= 0 and q.device.type == "cpu":
        return _BlockCausalAttention.apply(q, tuple(shifts), *k_blocks, *v_blocks)
    return _block_attention_math(q, k_blocks, v_blocks, groups, index, S, window)


def decode_attention(
    q: Tensor, k_new: Tensor, v_new: Tensor, cache_k: Tensor, cache_v: Tensor, lengths: Tensor, window: int = 0
) -> Tensor:
    """One new query per sequence attends to its cached keys plus its own new key.

    q: (B, H, 1, D); k_new/v_new: (B, Hkv, 1, D); cache: (B, Hkv, Tmax, D) with
    the first lengths[b] entries valid for sequence b.
    """
    B, H, _, D = q.shape
    Hkv = k_new.size(1)
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.view(B, Hkv, H // Hkv, D).to(acc)
    scale = 1.0 / math.sqrt(D)
    scores_cache = torch.einsum("bkgd,bktd->bkgt", qg, cache_k.to(acc)) * scale
    key_idx = torch.arange(cache_k.size(2), device=q.device)
    visible = key_idx[None, :] < lengths[:, None]
    if window > 0:
        visible = visible & (key_idx[None, :] > lengths[:, None] - window)
    scores_cache = scores_cache.masked_fill(~visible[:, None, None, :], float("-inf"))
    score_own = torch.einsum("bkgd,bkd->bkg", qg, k_new[:, :, 0].to(acc)).unsqueeze(-1) * scale
    probs = torch.softmax(torch.cat([scores_cache, score_own], dim=-1), dim=-1)
    out = torch.einsum("bkgt,bktd->bkgd", probs[..., :-1], cache_v.to(acc))
    out = out + probs[..., -1:] * v_new[:, :, 0].to(acc).unsqueeze(2)
    return out.reshape(B, H, 1, D).to(q.dtype)


# ---- internals ---------------------------------------------------------------------


def _use_flex(backend: str, q: Tensor) -> bool:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r}: allowed {ATTENTION_BACKENDS}")
    return backend == "flex" or (backend == "auto" and q.is_cuda)


@functools.lru_cache(maxsize=64)
def _block_mask(kind: str, n_q: int, n_kv: int, S: int, index: int, window: int, device: torch.device):
    """FlexAttention block mask on positions. "subset": queries at index + aS, keys
    in group order (group j at j + bS); "causal": both at 0..n-1. Static per shape,
    so it is built once."""
    from torch.nn.attention.flex_attention import create_block_mask

    if kind == "subset":
        q_pos = index + S * torch.arange(n_q, device=device)
        k_pos = torch.cat([torch.arange(j, n_kv, S, device=device) for j in range(S)])
    else:
        q_pos = k_pos = torch.arange(n_q, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_pos[q_idx] - k_pos[kv_idx]
        return (diff >= 0) & ((diff < window) if window > 0 else (diff >= 0))

    return create_block_mask(mask_mod, None, None, n_q, n_kv, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    flex = _compiled_flex() if q.is_cuda else _eager_flex()
    return flex(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))


def _eager_flex():
    """Uncompiled FlexAttention (CPU: forward only, for tests of the GPU path)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _expand_kv(k: Tensor, v: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    groups = n_heads // k.size(1)
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _visible(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """Boolean (n, m) mask: key position <= query position, within the window."""
    diff = q_pos[:, None] - k_pos[None, :]
    visible = diff >= 0
    if window > 0:
        visible = visible & (diff < window)
    return visible


def _block_attention_math(
    q: Tensor, k_blocks: list[Tensor], v_blocks: list[Tensor], groups: list[int], index: int, S: int, window: int
) -> Tensor:
    """Reference path (any device, sliding windows): explicit scores, one softmax.

    Query a of group `index` sits at position index + aS, key b of group j at j + bS.
    """
    n = q.size(2)
    scale = 1.0 / math.sqrt(q.size(-1))
    acc = torch.promote_types(q.dtype, torch.float32)
    q_pos = index + S * torch.arange(n, device=q.device)
    scores, values = [], []
    for k, v, group in zip(k_blocks, v_blocks, groups):
        k_pos = group + S * torch.arange(k.size(2), device=q.device)
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        scores.append(s.masked_fill(~_visible(q_pos, k_pos, window), float("-inf")))
        values.append(v.to(acc))
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    return torch.matmul(probs, torch.cat(values, dim=2)).to(q.dtype)


class _BlockCausalAttention(torch.autograd.Function):
    """Attention over several causal key blocks merged by log-sum-exp (CPU flash kernel).

    Block j is aligned so that query row a sees key rows b <= a - shift_j. Blocks
    of the same shift have the same shape, so they go through the kernel together,
    stacked along the batch (two kernel calls per pass, whatever S). The backward
    gives each block the merged output and log-sum-exp, which makes the kernel's
    per-block gradient the exact gradient of the merged attention (the identity
    ring attention relies on).
    """

    @staticmethod
    def forward(ctx, q: Tensor, shifts: tuple[int, ...], *kv: Tensor) -> Tensor:
        n_blocks = len(shifts)
        ks, vs = kv[:n_blocks], kv[n_blocks:]
        acc = torch.promote_types(q.dtype, torch.float32)
        outs, lses = [], []
        for shift, members in _by_shift(shifts):
            G = len(members)
            k, v = _stack([ks[j] for j in members]), _stack([vs[j] for j in members])
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(_repeat(q[:, :, shift:], G), k, v, 0.0, True)
            o, lse = o.unflatten(0, (G, -1)), lse.unflatten(0, (G, -1))
            if shift:
                o = F.pad(o, (0, 0, shift, 0))
                lse = F.pad(lse, (shift, 0), value=float("-inf"))
            outs.append(o)
            lses.append(lse.to(acc))
        o, lse_g = torch.cat(outs), torch.cat(lses)  # (blocks, B, H, n, D), (blocks, B, H, n)
        lse = torch.logsumexp(lse_g, dim=0)
        out = (torch.exp(lse_g - lse).unsqueeze(-1) * o.to(acc)).sum(0).to(q.dtype)
        ctx.shifts = shifts
        ctx.save_for_backward(q, out, lse, *kv)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, out, lse, *kv = ctx.saved_tensors
        shifts = ctx.shifts
        n_blocks = len(shifts)
        ks, vs = kv[:n_blocks], kv[n_blocks:]
        grad_out = grad_out.contiguous().to(q.dtype)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        dks, dvs = [None] * n_blocks, [None] * n_blocks
        for shift, members in _by_shift(shifts):
            G = len(members)
            k, v = _stack([ks[j] for j in members]), _stack([vs[j] for j in members])
            dq_g, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _repeat(grad_out[:, :, shift:], G), _repeat(q[:, :, shift:], G), k, v,
                _repeat(out[:, :, shift:], G), _repeat(lse[:, :, shift:], G), 0.0, True,
            )
            dq[:, :, shift:] += dq_g.unflatten(0, (G, -1)).sum(0)
            for j, dk_j, dv_j in zip(members, dk.unflatten(0, (G, -1)), dv.unflatten(0, (G, -1))):
                dks[j], dvs[j] = dk_j, dv_j
        return (dq.to(q.dtype), None, *dks, *dvs)


def _by_shift(shifts: tuple[int, ...]) -> list[tuple[int, list[int]]]:
    return [(shift, [j for j, s in enumerate(shifts) if s == shift]) for shift in sorted(set(shifts))]


def _stack(blocks: list[Tensor]) -> Tensor:
    """Blocks (B, H, m, D) -> (G * B, H, m, D); no copy for a single block."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _repeat(t: Tensor, G: int) -> Tensor:
    """(B, ...) -> (G * B, ...), the same tensor G times along the batch."""
    return t if G == 1 else t.repeat(G, *([1] * (t.dim() - 1)))
