"""The transformer block with the LRT memory inputs (DESIGN 2.1, 2.2).

One `forward` serves every pass kind; what the queries attend to is an
argument (`keys`), and everything the block computes that a schedule needs (the
fresh K/V, the pre-RoPE K and the feedback gate) is returned, never stored on
the module. Calls therefore always go through `Block.__call__`, where FSDP,
torch.compile and activation checkpointing see them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Protocol, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from titan_lrt.model.args import ModelArgs
from titan_lrt.model.attention import causal_attention, context_attention, decode_attention, subset_attention
from titan_lrt.model.layers import init_uniform_, rms_norm, rope_then_norm

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class SubsetKeys(NamedTuple):
    """Subset pass: the buffer's key/value groups (B, Hkv, n_j, D) for one layer.

    Group `index` is the queries' own group and is None: the block fills it with
    its fresh keys (the functional write into the buffer).
    """

    index: int
    keys: list[Optional[Tensor]]
    values: list[Optional[Tensor]]


class CacheKeys(NamedTuple):
    """Decode step: one layer's KV cache (B, Hkv, Tmax, D), lengths[b] entries valid."""

    keys: Tensor
    values: Tensor
    lengths: Tensor


class KeyExchange(Protocol):
    """Context parallelism: a pass whose positions are spread over the ranks of a group.

    The block hands its fresh K/V (at its own positions) to `gather`, which
    exchanges them across the group and returns the keys and values of every
    position 0..T-1 in position order, the ones the queries attend to (the
    communication lives in the key source, not in the block). `query_runs` gives
    the global positions of the block's queries as runs (first, count, stride).
    """

    query_runs: tuple[tuple[int, int, int], ...]
    key_count: int
    """How many positions `gather` returns (the whole sequence)."""

    def gather(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


Keys = Union[None, SubsetKeys, CacheKeys, KeyExchange]
"""What queries attend to: None for a full causal pass over the block's input."""


class Memory(NamedTuple):
    """The memory m_t at the block's positions, its feedback K/V for this layer, and the
    0-dim ramp r of the residual injection (gamma enters as r * gamma, lrt.gamma_warmup_steps)."""

    states: Tensor
    k_fb: Optional[Tensor]
    v_fb: Optional[Tensor]
    gamma_ramp: Tensor


class LayerKV(NamedTuple):
    """Fresh keys and values of one layer at the pass's positions.

    k, v: (B, Hkv, n, D) exactly as attention consumed them (after the gates,
    RoPE and QK-norm); k_pre: (B, n, Hkv, D) the gated key before RoPE; g_fb:
    (B, n, Hkv) the feedback gate (None where the layer has no K/V feedback).
    """

    k: Tensor
    v: Tensor
    k_pre: Tensor
    g_fb: Optional[Tensor]


class BlockOutput(NamedTuple):
    x: Tensor
    kv: LayerKV
    gate_means: Optional[Tensor]
    """Detached mean of each gate of this layer, in the order of `Attention.gate_names`."""


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.window, self.backend = args.window(layer), args.attention_backend
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        feedback = args.lrt.kv_feedback and layer in args.injected_layers()
        self.value_embed = nn.Embedding(args.padded_vocab_size, args.kv_dim) if args.has_value_embed(layer) else None
        self.gate_names: tuple[str, ...] = (("local", "feedback") if feedback else ()) + (
            ("value_embed",) if self.value_embed is not None else ()
        )
        self.gate_channels = args.gate_channels or args.dim
        self.gate = (
            nn.Linear(self.gate_channels, len(self.gate_names) * args.kv_heads, bias=False) if self.gate_names else None
        )

    def forward(
        self,
        h: Tensor,
        tokens: Tensor,
        cos: Tensor,
        sin: Tensor,
        memory: Optional[Memory],
        keys: Keys,
        block_mask: Optional[BlockMask] = None,
    ):
        B, n, _ = h.shape
        q = self.wq(h).view(B, n, self.n_heads, self.head_dim)
        k = self.wk(h).view(B, n, self.n_kv_heads, self.head_dim)
        v = self.wv(h).view(B, n, self.n_kv_heads, self.head_dim)

        g_fb, gate_means = None, None
        if self.gate is not None:
            gates = 2 * torch.sigmoid(self.gate(h[..., : self.gate_channels]))
            gates = gates.view(B, n, len(self.gate_names), self.n_kv_heads)
            gate_means = gates.detach().float().mean(dim=(0, 1, 3))
            g = dict(zip(self.gate_names, gates.unbind(dim=2)))
            if "feedback" in g:
                g_loc, g_fb = g["local"].unsqueeze(-1), g["feedback"]
                k, v = g_loc * k, g_loc * v
                if memory is not None:  # zero memory (pass 0) contributes nothing: skip it
                    # one multiply-add each (an eager decode step is bound by its op count)
                    gate = g_fb.unsqueeze(-1)
                    k, v = torch.addcmul(k, gate, memory.k_fb), torch.addcmul(v, gate, memory.v_fb)
            if "value_embed" in g:
                # the table is fp32 (autocast leaves lookups alone): keep v in the compute dtype
                ve = self.value_embed(tokens).view(B, n, self.n_kv_heads, self.head_dim).to(v.dtype)
                v = torch.addcmul(v, g["value_embed"].unsqueeze(-1), ve)
        k_pre = k

        q = rope_then_norm(q, cos, sin).transpose(1, 2)
        k = rope_then_norm(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if keys is None:
            y = causal_attention(q, k, v, self.window, self.backend, block_mask)
        elif isinstance(keys, SubsetKeys):
            group_k = [k if j == keys.index else kj for j, kj in enumerate(keys.keys)]
            group_v = [v if j == keys.index else vj for j, vj in enumerate(keys.values)]
            y = subset_attention(q, group_k, group_v, keys.index, self.window, self.backend, block_mask)
        elif isinstance(keys, CacheKeys):
            y = decode_attention(q, k, v, keys.keys, keys.values, keys.lengths, self.window)
        else:
            k_all, v_all = keys.gather(k, v)
            y = context_attention(q, k_all, v_all, keys.query_runs, self.window, self.backend, block_mask)
        y = self.wo(y.transpose(1, 2).reshape(B, n, -1))
        return y, LayerKV(k, v, k_pre, g_fb), gate_means

    @torch.no_grad()
    def init_weights(self, dim: int) -> None:
        for w in (self.wq, self.wk, self.wv):
            init_uniform_(w.weight, dim)
        nn.init.zeros_(self.wo.weight)
        if self.value_embed is not None:
            init_uniform_(self.value_embed.weight, dim)
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)  # all gates start at 2 * sigmoid(0) = 1


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.relu(self.w1(x)).square())

    @torch.no_grad()
    def init_weights(self, dim: int) -> None:
        init_uniform_(self.w1.weight, dim)
        nn.init.zeros_(self.w2.weight)


class Block(nn.Module):
    """x <- a*x + b*x0 (+ gamma*m); x <- x + attn(norm(x)); x <- x + mlp(norm(x))."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.dim = args.dim
        self.x0_init, self.gamma_init = args.x0_init, args.lrt.gamma_init
        self.attention = Attention(args, layer)
        self.mlp = MLP(args.dim, args.mlp_ratio * args.dim)
        self.resid_scale = nn.Parameter(torch.empty(1))
        self.x0_scale = nn.Parameter(torch.empty(1))
        injected = args.lrt.residual_injection and layer in args.injected_layers()
        self.gamma = nn.Parameter(torch.empty(1)) if injected else None

    def forward(
        self,
        x: Tensor,
        x0: Tensor,
        tokens: Tensor,
        cos: Tensor,
        sin: Tensor,
        memory: Optional[Memory],
        keys: Keys,
        block_mask: Optional[BlockMask] = None,
    ) -> BlockOutput:
        """block_mask: the FlexAttention mask of this layer's attention, built outside (see
        `titan_lrt.model.attention.BlockMasks`); None where the pass takes no FlexAttention."""
        x = self.resid_scale * x + self.x0_scale * x0
        if memory is not None and self.gamma is not None:
            x = torch.addcmul(x, self.gamma * memory.gamma_ramp, memory.states)
        y, kv, gate_means = self.attention(rms_norm(x), tokens, cos, sin, memory, keys, block_mask)
        x = x + y
        x = x + self.mlp(rms_norm(x))
        return BlockOutput(x, kv, gate_means)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.attention.init_weights(self.dim)
        self.mlp.init_weights(self.dim)
        self.resid_scale.fill_(1.0)
        self.x0_scale.fill_(self.x0_init)
        if self.gamma is not None:
            self.gamma.fill_(self.gamma_init)
