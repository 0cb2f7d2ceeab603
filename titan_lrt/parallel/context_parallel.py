"""Context parallelism: the positions of long sequences split over a group of ranks (DESIGN 2.6).

Every rank of a context-parallel (CP) group holds the same batch rows (the
data loader is sharded by data-parallel rank only) and computes a share of
their positions. With C ranks the sequence is cut into 2C equal chunks and
rank r takes chunk r and its mirror 2C-1-r, so that every rank's share of the
causal attention is the same (the head chunk sees few keys, the tail chunk
many).

Full passes (pass 0, the baseline, Jacobi passes). At every layer the block
hands its fresh local K/V to a `KeyExchange`; it all-gathers them over the
group, puts them in position order, and the block's queries attend to all of
them with the causal mask on global positions (the scheme Llama 3 used). The
all-gather is differentiable: its backward reduce-scatters the gradients of
the gathered K/V back to the ranks that computed them.

Interleaved LRT. `ContextParallelBuffer` is the shared buffer of DESIGN 2.4
spread over the group (the `Buffer` protocol of `titan_lrt.model.schedule`, as
`SharedBuffer`; `ContextParallel` is a `Layout`):
- build: pass 0's gathered K/V (taken from its exchanges, no second
  all-gather) and its source states (one all-gather) become, per layer, K/V
  and states of all T positions in position order, the same on every rank;
- memory: m_t at a rank's positions reads s_{t-1} from the gathered states,
  so the first position of a chunk gets the state of the previous rank's last
  position; resets at BOS use the global tokens;
- keys for pass i: per layer an exchange that all-gathers the fresh K/V of
  the subset positions P_i of every rank and writes them into the gathered
  buffer (out of place), so every rank attends to the same updated buffer a
  single device would;
- write: the exchange's updated K/V become the buffer; the pass's source
  states are all-gathered and merged, so pass i + 1 reads states refined by
  pass i on every rank;
- refresh (lrt.kv_refresh): each rank re-projects its own positions not yet
  refined, then they are all-gathered into the buffer.
Collectives, per layer and step: one all-gather of K/V in pass 0 and one per
refinement pass (1/S of the positions each), plus S + 1 all-gathers of source
states; their backward, when the buffer is not detached, is the matching
reduce-scatter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from titan_lrt.model.buffer import hold, keep_mask, refresh_source, refreshed_kv
from titan_lrt.model.memory import apply_reset
from titan_lrt.model.schedule import PassInputs
from titan_lrt.model.transformer import PassOutput, Transformer
from titan_lrt.parallel.collectives import all_gather_single


@dataclass(frozen=True)
class _Share:
    """Some positions of the sequence, as split over the group.

    positions: this rank's positions (ascending within each of its chunks);
    local_index: where they sit among the rank's full-pass positions;
    counts: how many each rank holds; order: the positions of all ranks in
    gather order (rank 0's, then rank 1's, ...); runs: this rank's positions as
    (first, count, stride) runs, one per chunk.
    """

    positions: Tensor
    local_index: Tensor
    counts: tuple[int, ...]
    order: Tensor
    runs: tuple[tuple[int, int, int], ...]


class ContextParallel:
    """The `Layout` of `run_schedule` under context parallelism (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # ---- which positions live where ------------------------------------------------

    def chunks(self, T: int, rank: int) -> tuple[range, range]:
        """The head chunk `rank` and the tail chunk 2C-1-rank of a length-T sequence."""
        C = self.degree
        if T % (2 * C):
            raise ValueError(f"sequence length {T} is not a multiple of 2 x context_parallel_degree = {2 * C}")
        c = T // (2 * C)
        return range(rank * c, (rank + 1) * c), range((2 * C - 1 - rank) * c, (2 * C - rank) * c)

    @functools.lru_cache(maxsize=64)
    def share(self, T: int, S: int, lo: int, hi: int, device: torch.device) -> _Share:
        """The positions t with lo <= t mod S < hi (S = 1, lo = 0, hi = 1: all of them)."""
        per_rank = []
        for rank in range(self.degree):
            runs, positions = [], []
            for chunk in self.chunks(T, rank):
                picked = [t for t in chunk if lo <= t % S < hi]
                positions += picked
                if picked:
                    runs.append((picked[0], len(picked), S if hi - lo == 1 else 1))
            per_rank.append((positions, tuple(runs)))
        own = per_rank[self.rank][0]
        everything = [t for chunk in self.chunks(T, self.rank) for t in chunk]
        index = {t: i for i, t in enumerate(everything)}

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        return _Share(
            positions=tensor(own),
            local_index=tensor([index[t] for t in own]),
            counts=tuple(len(p) for p, _ in per_rank),
            order=tensor([t for p, _ in per_rank for t in p]),
            runs=per_rank[self.rank][1] if hi - lo == 1 else (),
        )

    @functools.lru_cache(maxsize=16)
    def _inverse(self, T: int, device: torch.device) -> Tensor:
        """Gather order of all positions -> position order."""
        return torch.argsort(self.share(T, 1, 0, 1, device).order)

    # ---- the collective ------------------------------------------------------------

    def gather(self, x: Tensor, dim: int, counts: tuple[int, ...]) -> Tensor:
        """Concatenate along `dim` the x of every rank (rank r holding counts[r] entries), in
        rank order. Differentiable: the backward sends each piece's gradient, summed over
        the ranks that used it, back to its owner."""
        n = max(counts)
        if x.size(dim) < n:
            pad = list(x.shape)
            pad[dim] = n - x.size(dim)
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        gathered = all_gather_single(x.unsqueeze(0).contiguous(), 0, self.group)  # (C, *x.shape)
        if all(c == n for c in counts):
            return gathered.movedim(0, dim).flatten(dim, dim + 1)
        return torch.cat([gathered[r].narrow(dim, 0, c) for r, c in enumerate(counts)], dim=dim)

    def gather_positions(self, x: Tensor, dim: int) -> Tensor:
        """Full-pass values of this rank's positions (along dim) -> all T positions in order."""
        T = x.size(dim) * self.degree
        share = self.share(T, 1, 0, 1, x.device)
        return self.gather(x, dim, share.counts).index_select(dim, self._inverse(T, x.device))

    # ---- the layout interface of run_schedule --------------------------------------

    def full_pass(self, model: Transformer, tokens: Tensor, targets: Tensor | None) -> PassInputs:
        share = self.share(tokens.size(1), 1, 0, 1, tokens.device)
        local = share.positions
        return PassInputs(
            tokens=tokens[:, local],
            targets=None if targets is None else targets[:, local],
            positions=local,
            keys=[_FullPassExchange(self, share.runs, tokens.size(1)) for _ in model.layers],
        )

    def previous_states(self, states: Tensor, inputs: PassInputs) -> Tensor:
        """s_{t-1} at this rank's positions (a Jacobi pass's memory before resets)."""
        return self.gather_positions(states, dim=1).index_select(1, (inputs.positions - 1).clamp(min=0))

    def buffer(
        self, model: Transformer, tokens: Tensor, pass0: PassOutput, inputs: PassInputs, num_subsets: int, detach: bool
    ) -> ContextParallelBuffer:
        return ContextParallelBuffer(self, model, tokens, pass0, inputs, num_subsets, detach)


class _FullPassExchange:
    """A full pass's key source at one layer: all-gather K/V, keep them for the buffer."""

    def __init__(self, cp: ContextParallel, runs: tuple[tuple[int, int, int], ...], key_count: int):
        self.cp, self.query_runs, self.key_count = cp, runs, key_count
        self.k = self.v = None

    def gather(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k, self.v = self.cp.gather_positions(torch.stack([k, v]), dim=3).unbind(0)
        return self.k, self.v


class _SubsetExchange:
    """Subset pass i at one layer: all-gather the fresh K/V of P_i and write them into the
    (gathered, position-ordered) buffer, out of place; keep the result for the buffer."""

    def __init__(self, cp: ContextParallel, share: _Share, keys: Tensor, values: Tensor):
        self.cp, self.share, self.query_runs = cp, share, share.runs
        self.key_count = keys.size(2)
        self.base_k, self.base_v = keys, values
        self.k, self.v = keys, values

    def gather(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # From the buffer as it was before the pass: a recompute (activation checkpointing)
        # calling this again gives the same result.
        fresh = self.cp.gather(torch.stack([k, v]), 3, self.share.counts).to(self.base_k.dtype)
        self.k = self.base_k.index_copy(2, self.share.order, fresh[0])
        self.v = self.base_v.index_copy(2, self.share.order, fresh[1])
        return self.k, self.v


class ContextParallelBuffer:
    """The shared buffer of DESIGN 2.4 over a CP group; a `Buffer` like `SharedBuffer`.

    keys[layer], values[layer]: (B, Hkv, T, D) and states: (B, T, C), all positions in
    position order, identical on every rank of the group. positions[i]: this rank's
    positions of P_i.
    """

    def __init__(
        self,
        cp: ContextParallel,
        model: Transformer,
        tokens: Tensor,
        pass0: PassOutput,
        inputs: PassInputs,
        num_subsets: int,
        detach: bool,
    ):
        self.cp, self.model, self.S, self.detach = cp, model, num_subsets, detach
        T, device = tokens.size(1), tokens.device
        self.T, self.tokens = T, tokens
        self.shares = [cp.share(T, num_subsets, i, i + 1, device) for i in range(num_subsets)]
        self.positions = [share.positions for share in self.shares]
        self.keep = [keep_mask(model, tokens, pos) for pos in self.positions]
        self.local_positions = inputs.positions
        self.states = hold(cp.gather_positions(pass0.states, dim=1), detach)
        self.keys = [hold(exchange.k, detach) for exchange in inputs.keys]
        self.values = [hold(exchange.v, detach) for exchange in inputs.keys]
        # Per layer, the `RefreshSource` of a K/V refresh at this rank's full-pass positions.
        self.pass0_kv = [refresh_source(kv, detach) for kv in pass0.kv]
        self._exchanges: list[_SubsetExchange] = []

    def select(self, i: int, t: Tensor) -> Tensor:
        return t[:, self.positions[i]]

    def _memory_at(self, positions: Tensor, keep: Tensor) -> Tensor:
        return apply_reset(self.states.index_select(1, (positions - 1).clamp(min=0)), keep)

    def memory(self, i: int) -> Tensor:
        """m_t at this rank's positions of P_i: s_{t-1} from the gathered merged states."""
        return self._memory_at(self.positions[i], self.keep[i])

    def keys_for(self, i: int) -> list[_SubsetExchange]:
        share = self.shares[i]
        self._exchanges = [_SubsetExchange(self.cp, share, k, v) for k, v in zip(self.keys, self.values)]
        return self._exchanges

    def write(self, i: int, out: PassOutput) -> None:
        share = self.shares[i]
        states = self.cp.gather(out.states, 1, share.counts).to(self.states.dtype)
        self.states = hold(self.states.index_copy(1, share.order, states), self.detach)
        self.keys = [hold(exchange.k, self.detach) for exchange in self._exchanges]
        self.values = [hold(exchange.v, self.detach) for exchange in self._exchanges]

    def refresh(self, i: int) -> None:
        """Before pass i: re-project the feedback part of the K/V at positions t with
        t mod S > i from the newest merged states (each rank its own positions), then
        gather them into the buffer."""
        if i + 1 >= self.S:
            return
        cp = self.cp
        share = cp.share(self.T, self.S, i + 1, self.S, self.positions[0].device)
        pos, index = share.positions, share.local_index
        memory = self._memory_at(pos, keep_mask(self.model, self.tokens, pos))
        sources = [
            None if base is None else (base[0][:, :, index], base[1][:, index], base[2][:, index])
            for base in self.pass0_kv
        ]
        for layer, fresh in enumerate(refreshed_kv(self.model, memory, pos, sources, self.detach)):
            if fresh is None:
                continue
            kv = cp.gather(torch.stack(fresh), 3, share.counts).to(self.keys[layer].dtype)
            self.keys[layer] = self.keys[layer].index_copy(2, share.order, kv[0])
            self.values[layer] = self.values[layer].index_copy(2, share.order, kv[1])

    def merge(self, per_pass: list[Tensor]) -> Tensor:
        """Per-pass outputs at this rank's positions of P_0..P_{S-1} -> this rank's positions in
        full-pass order (detached)."""
        first = per_pass[0]
        out = first.new_empty((first.size(0), self.local_positions.numel(), *first.shape[2:]))
        for share, t in zip(self.shares, per_pass):
            out.index_copy_(1, share.local_index, t.detach())
        return out

    def merged_states(self) -> Tensor:
        """(B, n, C) merged source states at this rank's full-pass positions (detached)."""
        return self.states.index_select(1, self.local_positions).detach()

    def merged_kv(self) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError("return_kv (prefill for decoding) runs on one device, not under context parallelism")
