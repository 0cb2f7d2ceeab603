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
buffer. The kernel is a `BlockKernel`: the CPU flash kernel, or CUDA's flash
kernel in bf16/fp16. On CUDA nothing materialises score matrices: sliding
windows and other dtypes go to FlexAttention, whose block masks the model builds
once per shape outside the compiled blocks (`BlockMasks`, `uses_flex`) and hands in.

Under context parallelism (`context_attention`) a rank's queries are runs of
global positions (a head and a tail chunk of the sequence, strided by S in a
subset pass) and its keys are those of all positions, gathered from the group;
the mask is built from the global positions.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from titan_lrt.model.args import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int = 0, backend: str = "auto", block_mask: Optional[BlockMask] = None
) -> Tensor:
    """Full causal self-attention (optionally with a sliding window)."""
    if uses_flex("causal", backend, window, q.device, q.dtype):
        n = q.size(2)
        mask = _given_or_built(block_mask, ("causal", n, window), q.device)
        return _flex(q, k.to(q.dtype), v.to(q.dtype), mask)
    k, v = _expand_kv(k.to(q.dtype), v.to(q.dtype), q.size(1))
    if window <= 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    pos = torch.arange(q.size(2), device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(pos, pos, window))


def subset_attention(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    index: int,
    window: int = 0,
    backend: str = "auto",
    block_mask: Optional[BlockMask] = None,
) -> Tensor:
    """Queries of group `index` attend to the key groups 0..S-1 of the buffer.

    keys[j] / values[j] hold group j (length ceil((T - j) / S)); group `index`
    must already hold the fresh keys of these queries.
    """
    S = len(keys)
    n = q.size(2)
    if uses_flex("subset", backend, window, q.device, q.dtype):
        T = sum(k.size(2) for k in keys)
        mask = _given_or_built(block_mask, ("subset", n, T, S, index, window), q.device)
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
    if window <= 0 and block_kernel(q) is not None:
        return _BlockCausalAttention.apply(q, tuple(shifts), *k_blocks, *v_blocks)
    return _block_attention_math(q, k_blocks, v_blocks, groups, index, S, window)


def context_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    runs: tuple[tuple[int, int, int], ...],
    window: int = 0,
    backend: str = "auto",
    block_mask: Optional[BlockMask] = None,
) -> Tensor:
    """Queries at global positions attend to keys at positions 0..m-1 (context parallelism).

    runs: the queries in order, as runs (first, count, stride) of positions
    first, first + stride, ..., first + (count - 1) * stride. A key is visible
    when its position is <= the query's (and within the window). FlexAttention
    (CUDA): one block mask from the runs. CPU without a window: per run, the keys
    before it unmasked plus causal blocks (`_run_attention`), no mask built.
    Otherwise (sliding windows): SDPA with a mask, in pieces of at most
    `_QUERY_PIECE` queries that read only the keys their positions can see. In
    every path a rank's work follows the causal triangle of its own chunks.
    """
    if uses_flex("context", backend, window, q.device, q.dtype):
        mask = _given_or_built(block_mask, ("context", runs, k.size(2), window), q.device)
        return _flex(q, k.to(q.dtype), v.to(q.dtype), mask)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if window <= 0 and block_kernel(q) is not None:
        outs, start = [], 0
        for first, count, stride in runs:
            outs.append(_run_attention(q[:, :, start : start + count], k, v, first, count, stride))
            start += count
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    outs, start = [], 0
    for first, count, stride in runs:
        for a in range(0, count, _QUERY_PIECE):
            n = min(_QUERY_PIECE, count - a)
            p0 = first + a * stride
            end = p0 + (n - 1) * stride + 1
            lo = max(0, p0 - window + 1) if window > 0 else 0
            q_pos = p0 + stride * torch.arange(n, device=q.device)
            k_pos = torch.arange(lo, end, device=q.device)
            kk, vv = _expand_kv(k[:, :, lo:end], v[:, :, lo:end], q.size(1))
            mask = _visible(q_pos, k_pos, window)
            outs.append(F.scaled_dot_product_attention(q[:, :, start + a : start + a + n], kk, vv, attn_mask=mask))
        start += count
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _run_attention(q: Tensor, k: Tensor, v: Tensor, first: int, n: int, S: int) -> Tensor:
    """Queries at first, first + S, ..., first + (n - 1) S against keys at 0..m-1 (CPU flash kernel).

    The keys before `first` are all visible: one block without a mask. The rest,
    split by position mod S, are causal blocks as in a subset pass: the group of
    the queries from `first` on (query a sees key b <= a), every other group from
    its first position after `first` (query a sees key b <= a - 1). All blocks are
    merged by log-sum-exp in `_BlockCausalAttention`: no mask, no masked-out keys.
    """
    i = first % S
    blocks, shifts = [], []
    if first > 0:
        blocks.append((k[:, :, :first], v[:, :, :first]))
        shifts.append(-1)
    for g in range(S):
        shift = 0 if g == i else 1
        length = n - shift
        if length <= 0:
            continue
        start = first + (g - i) + (S if g < i else 0)
        end = start + S * (length - 1) + 1
        blocks.append((k[:, :, start:end:S].contiguous(), v[:, :, start:end:S].contiguous()))
        shifts.append(shift)
    expanded = [_expand_kv(kb, vb, q.size(1)) for kb, vb in blocks]
    return _BlockCausalAttention.apply(q, tuple(shifts), *(kb for kb, _ in expanded), *(vb for _, vb in expanded))


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


def _use_flex(backend: str, device: torch.device) -> bool:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r}: allowed {ATTENTION_BACKENDS}")
    return backend == "flex" or (backend == "auto" and device.type == "cuda")


def uses_flex(kind: str, backend: str, window: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a pass of `kind` ("causal", "subset", "context"; decode steps never) takes
    FlexAttention for queries of `dtype` on `device`: the one decision the attention calls and
    the model's block masks (`BlockMasks`) share. On CUDA a subset pass never materialises
    scores: sliding windows, and dtypes CUDA's flash kernel does not take, go to FlexAttention."""
    if _use_flex(backend, device):
        return kind != "causal" or window > 0
    if kind == "subset" and device.type == "cuda":
        return window > 0 or dtype not in _CUDA_FLASH_DTYPES
    return False


MaskKey = tuple
"""A block mask's shape: ("causal", n, window), ("subset", n_q, n_kv, S, index, window) or
("context", runs, n_kv, window)."""


def build_block_mask(key: MaskKey, device: torch.device) -> BlockMask:
    """The FlexAttention block mask of `key` on positions. "subset": queries at index + aS,
    keys in group order (group j at j + bS); "causal": both at 0..n-1; "context": queries
    given as position runs (first, count, stride), keys at 0..n_kv-1."""
    from torch.nn.attention.flex_attention import create_block_mask

    kind, window = key[0], key[-1]
    if kind == "subset":
        _, n_q, n_kv, S, index, _ = key
        q_pos = index + S * torch.arange(n_q, device=device)
        k_pos = torch.cat([torch.arange(j, n_kv, S, device=device) for j in range(S)])
    elif kind == "causal":
        n_q = n_kv = key[1]
        q_pos = k_pos = torch.arange(n_q, device=device)
    else:
        _, runs, n_kv, _ = key
        q_pos = torch.cat([first + stride * torch.arange(count, device=device) for first, count, stride in runs])
        n_q, k_pos = q_pos.numel(), torch.arange(n_kv, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_pos[q_idx] - k_pos[kv_idx]
        return (diff >= 0) & ((diff < window) if window > 0 else (diff >= 0))

    return create_block_mask(mask_mod, None, None, n_q, n_kv, device=device)


class BlockMasks:
    """FlexAttention block masks by shape, built once each, outside any compiled graph.

    The model asks for its layers' masks before it calls the blocks (`Transformer.forward`
    runs eager; the blocks are the compiled units) and hands each block its mask, so a
    compiled block never builds one: the count of masks built is the count of distinct
    (pass kind, length, window) shapes, whatever the number of layers or steps.
    """

    def __init__(self):
        self.masks: dict[tuple, BlockMask] = {}
        self.built = 0

    def get(self, key: MaskKey, device: torch.device) -> BlockMask:
        full_key = (*key, str(device))
        mask = self.masks.get(full_key)
        if mask is None:
            mask = self.masks[full_key] = build_block_mask(key, device)
            self.built += 1
        return mask


def _given_or_built(block_mask: Optional[BlockMask], key: MaskKey, device: torch.device) -> BlockMask:
    """The mask the model built for this call; direct eager calls (tests) build their own.
    Inside a compiled graph building one would run per block call: refused."""
    if block_mask is not None:
        return block_mask
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"FlexAttention block mask {key} requested inside a compiled graph: masks are built outside "
            "(Transformer.forward passes each block its mask from `BlockMasks`)"
        )
    return build_block_mask(key, device)


_QUERY_PIECE = 512
"""Queries per piece in `context_attention` on the SDPA path (finer pieces skip more
masked-out keys, coarser ones launch fewer kernels)."""


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


class BlockKernel(NamedTuple):
    """Attention of queries to one key block, returning the log-sum-exp for merging.

    forward(q, k, v, causal) -> (out, lse, saved): out (B, H, n, D) in q's dtype, lse
    (B, H, n) the natural-log normaliser in fp32, saved whatever backward needs.
    backward(grad_out, q, k, v, out, lse, causal, saved) -> (dq, dk, dv). Given the
    *merged* out and lse of all blocks, it returns this block's share of the exact
    gradient of the merged attention. `causal` aligns query a with key a (square
    blocks). The CPU flash kernel and CUDA's flash kernel are two providers of it.
    """

    forward: Callable
    backward: Callable


def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse, ()


def _cpu_backward(grad_out, q, k, v, out, lse, causal, saved):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse, 0.0, causal)


def _cuda_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool):
    out, lse, *saved = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    return out, lse, tuple(saved[:6])  # cum_seq_q, cum_seq_k, max_q, max_k, philox seed and offset


def _cuda_backward(grad_out, q, k, v, out, lse, causal, saved):
    cum_q, cum_k, max_q, max_k, seed, offset = saved
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out.contiguous(),
        lse.contiguous(),
        cum_q,
        cum_k,
        max_q,
        max_k,
        0.0,
        causal,
        seed,
        offset,
    )[:3]


BLOCK_KERNELS = {"cpu": BlockKernel(_cpu_forward, _cpu_backward), "cuda": BlockKernel(_cuda_forward, _cuda_backward)}

_CUDA_FLASH_DTYPES = (torch.bfloat16, torch.float16)


def block_kernel(q: Tensor) -> Optional[BlockKernel]:
    """The log-sum-exp block kernel for q's device and dtype (None: none there; CUDA's
    flash kernel takes half precision only)."""
    if q.is_cuda and q.dtype not in _CUDA_FLASH_DTYPES:
        return None
    return BLOCK_KERNELS.get(q.device.type)


def merge_blocks(outs: Tensor, lses: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge per-block attention (blocks, B, H, n, D) by their log-sum-exps (blocks, B, H, n)."""
    lse = torch.logsumexp(lses, dim=0)
    out = (torch.exp(lses - lse).unsqueeze(-1) * outs.to(lses.dtype)).sum(0)
    return out.to(dtype), lse


class _BlockCausalAttention(torch.autograd.Function):
    """Attention over several causal key blocks merged by log-sum-exp (`BlockKernel`).

    Block j is aligned so that query row a sees key rows b <= a - shift_j; a block
    with shift -1 is seen whole by every query (no mask; context parallelism's keys
    before a chunk). Blocks of the same shift have the same shape, so they go through the kernel together,
    stacked along the batch (two kernel calls per pass, whatever S). The backward
    gives each block the merged output and log-sum-exp, which makes the kernel's
    per-block gradient the exact gradient of the merged attention (the identity
    ring attention relies on).
    """

    @staticmethod
    def forward(ctx, q: Tensor, shifts: tuple[int, ...], *kv: Tensor) -> Tensor:
        n_blocks = len(shifts)
        ks, vs = kv[:n_blocks], kv[n_blocks:]
        kernel = block_kernel(q)
        acc = torch.promote_types(q.dtype, torch.float32)
        outs, lses, saved = [], [], []
        for shift, members in _by_shift(shifts):
            G = len(members)
            k, v = _stack([ks[j] for j in members]), _stack([vs[j] for j in members])
            causal, shift = shift >= 0, max(shift, 0)
            o, lse, kernel_saved = kernel.forward(_repeat(q[:, :, shift:], G), k, v, causal)
            saved.append(kernel_saved)
            o, lse = o.unflatten(0, (G, -1)), lse.unflatten(0, (G, -1))
            if shift:
                o = F.pad(o, (0, 0, shift, 0))
                lse = F.pad(lse, (shift, 0), value=float("-inf"))
            outs.append(o)
            lses.append(lse.to(acc))
        out, lse = merge_blocks(torch.cat(outs), torch.cat(lses), q.dtype)  # (blocks, B, H, n, D), (blocks, B, H, n)
        ctx.shifts, ctx.kernel, ctx.kernel_saved = shifts, kernel, saved
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
        for (shift, members), kernel_saved in zip(_by_shift(shifts), ctx.kernel_saved):
            G = len(members)
            k, v = _stack([ks[j] for j in members]), _stack([vs[j] for j in members])
            causal, shift = shift >= 0, max(shift, 0)
            dq_g, dk, dv = ctx.kernel.backward(
                _repeat(grad_out[:, :, shift:], G),
                _repeat(q[:, :, shift:], G),
                k,
                v,
                _repeat(out[:, :, shift:], G),
                _repeat(lse[:, :, shift:], G),
                causal,
                kernel_saved,
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
