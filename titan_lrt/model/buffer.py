"""The shared buffer of interleaved parallel training (DESIGN 2.4, 2.6).

After pass 0 the buffer holds, for every layer, the keys and values of all T
positions, and the source states of all positions. It is organised by subset:
group j holds the positions P_j = {j, j + S, j + 2S, ...}, so that a subset
pass reads and replaces whole groups and nothing is ever written in place
(autograd stays correct without cloning the buffer). The interface is small on
purpose -- build, select a subset's inputs, memory for a subset, keys for a
subset, write back, refresh, merge (the `Buffer` protocol of
`titan_lrt.model.schedule`) -- so that context parallelism gathers it across
ranks without touching the model (`titan_lrt.parallel.context_parallel.
ContextParallelBuffer` implements the same protocol). The pieces both share --
holding a tensor, the keep masks, the K/V refresh -- live here.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from titan_lrt.model.block import LayerKV, SubsetKeys
from titan_lrt.model.layers import rope_then_norm
from titan_lrt.model.memory import apply_reset, memory_keep_mask
from titan_lrt.model.transformer import PassOutput, Transformer

RefreshSource = tuple[Tensor, Tensor, Tensor]
"""What a K/V refresh re-projects from, at some positions of one layer: pass 0's values
V_0 (B, Hkv, n, D), gated pre-RoPE keys K_pre,0 (B, n, Hkv, D) and feedback gates g_fb
(B, n, Hkv). Pass 0 had zero memory, so its feedback part is exactly 0."""


def hold(t: Tensor, detach: bool) -> Tensor:
    """What the buffer keeps of t: cut from the graph when passes exchange no gradients."""
    return t.detach() if detach else t


def keep_mask(model: Transformer, tokens: Tensor, positions: Tensor) -> Tensor:
    """Where the memory carries over at `positions` of (B, T) tokens (reset at 0 and at BOS)."""
    args = model.args
    return memory_keep_mask(tokens[:, positions], positions, args.bos_token_id, args.lrt.reset_at_bos)


def refresh_source(kv: LayerKV, detach: bool) -> Optional[RefreshSource]:
    """A layer's `RefreshSource` at all of pass 0's positions (None: the layer gets no feedback)."""
    if kv.g_fb is None:
        return None
    return hold(kv.v, detach), hold(kv.k_pre, detach), hold(kv.g_fb, detach)


def refreshed_kv(
    model: Transformer, memory: Tensor, positions: Tensor, sources: Sequence[Optional[RefreshSource]], detach: bool
) -> list[Optional[tuple[Tensor, Tensor]]]:
    """Per layer, (K, V) of shape (B, Hkv, n, D) at `positions` with their feedback part
    re-projected from `memory` (B, n, dim); None where the layer has no source.

    V is linear in the feedback: V = V_0 + g_fb * W_V m. K needs RoPE and QK-norm
    re-applied to the gated pre-RoPE key K_pre,0 + g_fb * W_K m.
    """
    if all(source is None for source in sources):  # no K/V feedback: nothing to refresh
        return [None] * len(sources)
    out: list[Optional[tuple[Tensor, Tensor]]] = []
    with torch.no_grad() if detach else contextlib.nullcontext():
        feedback = model.feedback(memory)
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
        for layer, source in enumerate(sources):
            if source is None:
                out.append(None)
                continue
            v0, k_pre0, g_fb = source
            k_fb, v_fb = feedback[layer]
            gate = g_fb.unsqueeze(-1)
            v = v0 + (gate * v_fb).transpose(1, 2)
            k = rope_then_norm(k_pre0 + gate * k_fb, cos, sin).transpose(1, 2)
            out.append((k, v))
    return out


class SharedBuffer:
    def __init__(self, model: Transformer, tokens: Tensor, pass0: PassOutput, num_subsets: int, detach: bool):
        """Build the buffer from pass 0 (zero memory, all positions)."""
        self.model, self.S, self.detach = model, num_subsets, detach
        T = tokens.size(1)
        self.T = T
        self.positions = [torch.arange(j, T, num_subsets, device=tokens.device) for j in range(num_subsets)]
        self.keep = [keep_mask(model, tokens, pos) for pos in self.positions]
        self.states = self._split(pass0.states, dim=1)
        self.keys = [self._split(kv.k, dim=2) for kv in pass0.kv]
        self.values = [self._split(kv.v, dim=2) for kv in pass0.kv]
        # Per layer (None: no feedback) and group, the `RefreshSource` of a K/V refresh
        # (the values are the buffer's own groups; _split holds the rest).
        self.pass0_kv = [
            None if source is None else list(zip(values, self._split(source[1], dim=1), self._split(source[2], dim=1)))
            for source, values in zip((refresh_source(kv, detach) for kv in pass0.kv), self.values)
        ]

    def _split(self, t: Tensor, dim: int) -> list[Tensor]:
        """Groups j::S of t along dim (as views of one reshape when S divides T, whose
        backward is a single stack rather than S zero-filled scatters)."""
        S = self.S
        t = hold(t, self.detach)
        if self.T % S == 0:
            return list(t.unflatten(dim, (self.T // S, S)).unbind(dim + 1))
        return [t[(slice(None),) * dim + (slice(j, None, S),)] for j in range(S)]

    def select(self, i: int, t: Tensor) -> Tensor:
        """The entries of a (B, T, ...) per-position tensor (tokens, targets) at P_i."""
        return t[:, i :: self.S]

    def memory(self, i: int) -> Tensor:
        """m_t at P_i: the latest merged source state of position t - 1, reset where due."""
        n = len(self.positions[i])
        if i > 0:
            previous = self.states[i - 1][:, :n]  # t - 1 lies in group i - 1
        else:  # t - 1 = (t - S) + (S - 1) lies in the last group, one row earlier
            previous = torch.nn.functional.pad(self.states[self.S - 1][:, : n - 1], (0, 0, 1, 0))
        return apply_reset(previous, self.keep[i])

    def keys_for(self, i: int) -> list[SubsetKeys]:
        """Per layer, the key/value groups that the queries of P_i attend to."""
        return [
            SubsetKeys(
                i, [None if j == i else k for j, k in enumerate(ks)], [None if j == i else v for j, v in enumerate(vs)]
            )
            for ks, vs in zip(self.keys, self.values)
        ]

    def write(self, i: int, out: PassOutput) -> None:
        """Replace group i by the subset pass's fresh keys, values and source states."""
        self.states[i] = hold(out.states, self.detach)
        for layer, kv in enumerate(out.kv):
            self.keys[layer][i] = hold(kv.k, self.detach)
            self.values[layer][i] = hold(kv.v, self.detach)

    def refresh(self, i: int) -> None:
        """Before pass i: re-project the feedback part of the K/V of groups j > i
        (not refined yet) from the newest merged source states (see `refreshed_kv`)."""
        for j in range(i + 1, self.S):
            sources = [None if base is None else base[j] for base in self.pass0_kv]
            fresh = refreshed_kv(self.model, self.memory(j), self.positions[j], sources, self.detach)
            for layer, kv in enumerate(fresh):
                if kv is not None:
                    self.keys[layer][j], self.values[layer][j] = kv

    def merge(self, per_pass: list[Tensor]) -> Tensor:
        """Per-pass (B, n_i, ...) outputs at P_0..P_{S-1} in position order (detached)."""
        return interleave_groups(per_pass, self.T, dim=1)

    def merged_states(self) -> Tensor:
        """(B, T, C) source states in position order (detached)."""
        return interleave_groups(self.states, self.T, dim=1)

    def merged_kv(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer (K, V) of shape (B, Hkv, T, D) in position order (detached)."""
        return [
            (interleave_groups(ks, self.T, dim=2), interleave_groups(vs, self.T, dim=2))
            for ks, vs in zip(self.keys, self.values)
        ]


def interleave_groups(groups: list[Tensor], T: int, dim: int) -> Tensor:
    """Put tensors holding positions j::S (j = 0..S-1) back into position order (detached)."""
    S = len(groups)
    shape = list(groups[0].shape)
    shape[dim] = T
    out = groups[0].new_empty(shape)
    for j, g in enumerate(groups):
        out[(slice(None),) * dim + (slice(j, None, S),)] = g.detach()
    return out
