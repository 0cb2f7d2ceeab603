"""The shared buffer of interleaved parallel training (DESIGN 2.4, 2.6).

After pass 0 the buffer holds, for every layer, the keys and values of all T
positions, and the source states of all positions. It is organised by subset:
group j holds the positions P_j = {j, j + S, j + 2S, ...}, so that a subset
pass reads and replaces whole groups and nothing is ever written in place
(autograd stays correct without cloning the buffer). The interface is small on
purpose -- build, select a subset's inputs, memory for a subset, keys for a
subset, write back, refresh, merge -- so that context parallelism gathers it
across ranks without touching the model (`titan_lrt.parallel.context_parallel.
ContextParallelBuffer` implements the same interface).
"""

from __future__ import annotations

import contextlib
import torch
from torch import Tensor

from titan_lrt.model.block import SubsetKeys
from titan_lrt.model.layers import rope_then_norm
from titan_lrt.model.memory import apply_reset, memory_keep_mask
from titan_lrt.model.transformer import PassOutput, Transformer


class SharedBuffer:
    def __init__(self, model: Transformer, tokens: Tensor, pass0: PassOutput, num_subsets: int, detach: bool):
        """Build the buffer from pass 0 (zero memory, all positions)."""
        args = model.args
        self.model, self.S, self.detach = model, num_subsets, detach
        T = tokens.size(1)
        self.T = T
        self.positions = [torch.arange(j, T, num_subsets, device=tokens.device) for j in range(num_subsets)]
        self.keep = [
            memory_keep_mask(tokens[:, j::num_subsets], pos, args.bos_token_id, args.lrt.reset_at_bos)
            for j, pos in enumerate(self.positions)
        ]
        self.states = self._split(pass0.states, dim=1)
        self.keys = [self._split(kv.k, dim=2) for kv in pass0.kv]
        self.values = [self._split(kv.v, dim=2) for kv in pass0.kv]
        # What a K/V refresh re-projects from: pass 0's values, gated pre-RoPE keys and
        # feedback gates (pass 0 had zero memory, so its feedback part is exactly 0).
        self.pass0_kv = [
            list(zip(values, self._split(kv.k_pre, dim=1), self._split(kv.g_fb, dim=1)))
            if kv.g_fb is not None
            else None
            for kv, values in zip(pass0.kv, self.values)
        ]

    def _split(self, t: Tensor, dim: int) -> list[Tensor]:
        """Groups j::S of t along dim (as views of one reshape when S divides T, whose
        backward is a single stack rather than S zero-filled scatters)."""
        S = self.S
        t = t.detach() if self.detach else t
        if self.T % S == 0:
            return list(t.unflatten(dim, (self.T // S, S)).unbind(dim + 1))
        return [t[(slice(None),) * dim + (slice(j, None, S),)] for j in range(S)]

    def _hold(self, t: Tensor) -> Tensor:
        return t.detach() if self.detach else t

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
            SubsetKeys(i, [None if j == i else k for j, k in enumerate(ks)], [None if j == i else v for j, v in enumerate(vs)])
            for ks, vs in zip(self.keys, self.values)
        ]

    def write(self, i: int, out: PassOutput) -> None:
        """Replace group i by the subset pass's fresh keys, values and source states."""
        self.states[i] = self._hold(out.states)
        for layer, kv in enumerate(out.kv):
            self.keys[layer][i] = self._hold(kv.k)
            self.values[layer][i] = self._hold(kv.v)

    def refresh(self, i: int) -> None:
        """Before pass i: re-project the feedback part of the K/V of groups j > i
        (not refined yet) from the newest merged source states.

        V is linear in the feedback: V = V_0 + g_fb * W_V m. K needs RoPE and
        QK-norm re-applied to the gated pre-RoPE key K_pre,0 + g_fb * W_K m.
        """
        model = self.model
        grad = torch.no_grad() if self.detach else contextlib.nullcontext()
        with grad:
            for j in range(i + 1, self.S):
                feedback = model.feedback(self.memory(j))
                cos, sin = model.rope_cos[self.positions[j]], model.rope_sin[self.positions[j]]
                for layer, base in enumerate(self.pass0_kv):
                    if base is None:
                        continue
                    v0, k_pre0, g_fb = base[j]
                    k_fb, v_fb = feedback[layer]
                    gate = g_fb.unsqueeze(-1)
                    self.values[layer][j] = v0 + (gate * v_fb).transpose(1, 2)
                    self.keys[layer][j] = rope_then_norm(k_pre0 + gate * k_fb, cos, sin).transpose(1, 2)

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
