"""Training schedules of the LRT (DESIGN 2.4): interleaved, Jacobi, and off.

Each schedule runs the passes of one step on a batch and returns a
`StepResult`. When a `backward` callable is given, the schedule also runs the
backward: once on the total loss, or -- with `lrt.detach_buffer`, where passes
do not exchange gradients -- after every pass as its own micro-step, which frees
each pass's activations before the next pass starts.

Where the positions of a sequence are computed is the `Layout`'s business: by
default all of them on this device (`WholeSequence`); under context
parallelism (`titan_lrt.parallel.context_parallel.ContextParallel`) each rank
of a group computes its own share and the layout's `Buffer` gathers what the
others need. The schedules read the same either way; every per-position output
in the `StepResult` is at the positions this rank computed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from titan_lrt.model.args import LRTArgs
from titan_lrt.model.block import Keys
from titan_lrt.model.buffer import SharedBuffer
from titan_lrt.model.memory import apply_reset, memory_keep_mask, shift_right
from titan_lrt.model.transformer import IGNORE_INDEX, PassOutput, Transformer

Backward = Callable[[Tensor, bool], None]
"""backward(loss, last): run the backward of loss; `last` marks the final one of the step."""


@dataclass
class StepResult:
    loss: Optional[Tensor]
    """Weighted total loss (None without targets). It carries the autograd graph
    unless the schedule already ran the backward."""

    pass_losses: list[Tensor]
    """Detached mean loss of each pass, pass 0 first."""

    pass_token_losses: list[Tensor]
    """Per pass, the detached per-position losses at the positions it computed."""

    pass_positions: list[Tensor]
    """Per pass, the positions it computed (all T for full passes; this rank's share
    under context parallelism)."""

    token_loss: Optional[Tensor]
    """(B, T) merged per-position loss: each position scored by the last pass that
    computed it (under context parallelism: at this rank's positions `pass_positions[0]`)."""

    states: Tensor
    """(B, T, dim) merged source states (detached; at `pass_positions[0]`)."""

    gate_means: list[list[Optional[Tensor]]]
    """Per pass, per layer, the mean of each gate."""

    logits: Optional[Tensor] = None
    """(B, T, vocab) merged logits, without targets only."""

    kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """Per layer merged (K, V) in position order, when asked (prefill for decoding)."""


class PassInputs(NamedTuple):
    """What a full pass computes on this device: the tokens and targets at its
    positions, the positions, and per layer what its queries attend to."""

    tokens: Tensor
    targets: Optional[Tensor]
    positions: Tensor
    keys: Optional[Sequence[Keys]]


@runtime_checkable
class Buffer(Protocol):
    """The shared buffer of the interleaved schedule (DESIGN 2.4): per layer the K/V of all
    positions and the source states, refined subset by subset. `SharedBuffer` holds it on
    one device, `ContextParallelBuffer` over a context-parallel group."""

    positions: list[Tensor]
    """Per subset i, the positions of P_i that this device computes."""

    def select(self, i: int, t: Tensor) -> Tensor:
        """The entries of a (B, T, ...) per-position tensor (tokens, targets) at `positions[i]`."""
        ...

    def memory(self, i: int) -> Tensor:
        """m_t at `positions[i]`: the latest merged source state of position t - 1, reset where due."""
        ...

    def keys_for(self, i: int) -> Sequence[Keys]:
        """Per layer, what the queries of subset pass i attend to."""
        ...

    def write(self, i: int, out: PassOutput) -> None:
        """Take in subset pass i's fresh keys, values and source states."""
        ...

    def refresh(self, i: int) -> None:
        """Before pass i: re-project the feedback part of the K/V not refined yet (lrt.kv_refresh)."""
        ...

    def merge(self, per_pass: list[Tensor]) -> Tensor:
        """Per-subset outputs at `positions[0..S-1]` -> this device's full-pass positions (detached)."""
        ...

    def merged_states(self) -> Tensor:
        """Merged source states at this device's full-pass positions (detached)."""
        ...

    def merged_kv(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer (K, V) of all positions in position order (detached; prefill for decoding)."""
        ...


@runtime_checkable
class Layout(Protocol):
    """Which positions of a sequence this device computes, and how it sees the others."""

    def full_pass(self, model: Transformer, tokens: Tensor, targets: Optional[Tensor]) -> PassInputs:
        """What a full pass computes here, from the (B, T) batch every device of the layout holds."""
        ...

    def previous_states(self, states: Tensor, inputs: PassInputs) -> Tensor:
        """s_{t-1} at the full pass's positions (0 at position 0), from its states there."""
        ...

    def buffer(
        self, model: Transformer, tokens: Tensor, pass0: PassOutput, inputs: PassInputs, num_subsets: int, detach: bool
    ) -> Buffer:
        """The interleaved schedule's buffer, built from pass 0."""
        ...


class WholeSequence:
    """The default `Layout`: every position of the sequence on this device."""

    def full_pass(self, model: Transformer, tokens: Tensor, targets: Optional[Tensor]) -> PassInputs:
        return PassInputs(tokens, targets, _all_positions(tokens), None)

    def previous_states(self, states: Tensor, inputs: PassInputs) -> Tensor:
        """s_{t-1} at the full pass's positions (0 at position 0)."""
        return shift_right(states)

    def buffer(
        self, model: Transformer, tokens: Tensor, pass0: PassOutput, inputs: PassInputs, num_subsets: int, detach: bool
    ) -> SharedBuffer:
        return SharedBuffer(model, tokens, pass0, num_subsets, detach)


def run_schedule(
    model: Transformer,
    tokens: Tensor,
    targets: Optional[Tensor] = None,
    backward: Optional[Backward] = None,
    return_kv: bool = False,
    loss_denominators: Optional[Sequence[float]] = None,
    layout: Optional[Layout] = None,
    passes: Optional[int] = None,
) -> StepResult:
    """Run the schedule chosen by `model.args.lrt.mode` on a (B, T) batch.

    Each pass's loss is the sum of its per-position losses divided by its
    entry of `loss_denominators` (default: the number of scored targets it
    computed here, i.e. the mean); a data-parallel trainer passes global counts.
    `layout` says which positions this device computes (default: all; a
    `ContextParallel` splits them over its group, every rank passing the same batch).
    `passes` (default: all of the schedule's) is what the step runs, from `LRTArgs.passes_at`:
    1 runs pass 0 alone, at the baseline's cost; Jacobi runs that many full passes.
    """
    lrt = model.args.lrt
    passes = passes or lrt.num_passes
    if passes == 1:
        schedule = baseline
    else:
        schedule = {"interleaved": interleaved, "jacobi": jacobi}[lrt.mode]
    return schedule(model, tokens, targets, backward, return_kv, loss_denominators, layout or WholeSequence(), passes)


def baseline(
    model,
    tokens,
    targets=None,
    backward=None,
    return_kv=False,
    loss_denominators=None,
    layout: Layout = WholeSequence(),
    passes: int = 1,
) -> StepResult:
    """One full pass (LRT off, or zero memory)."""
    run = _Losses(targets, backward, detach=False, weights=[1.0], denominators=loss_denominators)
    inputs = layout.full_pass(model, tokens, targets)
    out = model(inputs.tokens, inputs.targets, positions=inputs.positions, keys=inputs.keys)
    run.add(out, inputs.targets)
    run.finish()
    return run.result([out], [inputs.positions], merged=out, kv=_kv(out) if return_kv else [])


def jacobi(
    model,
    tokens,
    targets=None,
    backward=None,
    return_kv=False,
    loss_denominators=None,
    layout: Layout = WholeSequence(),
    passes: Optional[int] = None,
) -> StepResult:
    """K full passes; pass k reads the memory shift_right(s^{k-1}), pass 0 zero memory."""
    lrt = model.args.lrt
    K = passes or lrt.jacobi_passes
    weights = _pass0_weighted(lrt, (lrt.jacobi_weights or [1.0] * lrt.jacobi_passes)[:K], K)
    run = _Losses(targets, backward, lrt.detach_buffer, weights, loss_denominators)
    inputs = layout.full_pass(model, tokens, targets)
    keep = memory_keep_mask(inputs.tokens, inputs.positions, model.args.bos_token_id, lrt.reset_at_bos)
    memory, outs = None, []
    for k in range(K):
        with _autograd(k > 0 or lrt.trains_pass0(K)):
            out = model(inputs.tokens, inputs.targets, positions=inputs.positions, memory=memory, keys=inputs.keys)
        run.add(out, inputs.targets)
        outs.append(out)
        states = out.states.detach() if lrt.detach_buffer else out.states
        memory = apply_reset(layout.previous_states(states, inputs), keep)
    run.finish()
    return run.result(outs, [inputs.positions] * K, merged=outs[-1], kv=_kv(outs[-1]) if return_kv else [])


def interleaved(
    model,
    tokens,
    targets=None,
    backward=None,
    return_kv=False,
    loss_denominators=None,
    layout: Layout = WholeSequence(),
    passes: Optional[int] = None,
) -> StepResult:
    """Pass 0 over all positions builds the shared buffer; then S subset passes refine it."""
    lrt = model.args.lrt
    S = lrt.num_subsets
    if passes not in (None, 1 + S):
        raise ValueError(f"an interleaved step runs 1 or 1 + S = {1 + S} passes, not {passes}")
    weights = _pass0_weighted(lrt, [lrt.pass0_weight] + [1.0] * S, 1 + S)
    run = _Losses(targets, backward, lrt.detach_buffer, weights, loss_denominators)

    # Pass 0: all T positions, zero memory; its K/V and source states fill the buffer.
    inputs = layout.full_pass(model, tokens, targets)
    with _autograd(lrt.trains_pass0(1 + S)):
        out0 = model(inputs.tokens, inputs.targets, positions=inputs.positions, keys=inputs.keys)
    run.add(out0, inputs.targets)
    buffer = layout.buffer(model, tokens, out0, inputs, S, detach=lrt.detach_buffer)
    outs = [out0]

    # Refinement: pass i computes P_i = {t : t mod S == i} with memory from the latest
    # merged states, writes its fresh K/V and states back, and pass i + 1 reads them.
    for i in range(S):
        if lrt.refreshes_kv:
            buffer.refresh(i)
        subset_targets = None if targets is None else buffer.select(i, targets)
        out = model(
            buffer.select(i, tokens),
            subset_targets,
            positions=buffer.positions[i],
            memory=buffer.memory(i),
            keys=buffer.keys_for(i),
        )
        buffer.write(i, out)
        run.add(out, subset_targets)
        outs.append(out)
    run.finish()

    merged = PassOutput(
        states=buffer.merged_states(),
        kv=[],
        gate_means=[],
        logits=None if targets is not None else buffer.merge([o.logits for o in outs[1:]]),
        token_loss=None if targets is None else buffer.merge([o.token_loss for o in outs[1:]]),
    )
    positions = [inputs.positions] + buffer.positions
    return run.result(outs, positions, merged, kv=buffer.merged_kv() if return_kv else [])


def pass_target_counts(lrt: LRTArgs, targets: Tensor, passes: Optional[int] = None) -> Tensor:
    """Scored targets of each pass of a step of `passes` passes (default: all) over (..., T) targets
    (every leading dim summed), as float64, pass 0 first: what `loss_denominators` holds once summed
    over the global batch."""
    scored = (targets != IGNORE_INDEX).reshape(-1, targets.size(-1)).sum(0)  # (T,)
    spans = lrt.pass_positions(targets.size(-1), passes)
    return torch.stack([scored[span.start : span.stop : span.step].sum() for span in spans]).double()


# ---- internals ---------------------------------------------------------------------


def mean_loss(token_loss: Tensor, targets: Tensor) -> Tensor:
    """Mean over the positions whose target is scored."""
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return token_loss.sum() / count


def _pass0_weighted(lrt: LRTArgs, weights: list[float], passes: int) -> list[float]:
    """Loss weights of a step's passes: pass 0 has none when it runs without autograd."""
    return weights if lrt.trains_pass0(passes) else [0.0] + weights[1:]


def _autograd(enabled: bool):
    return contextlib.nullcontext() if enabled else torch.no_grad()


def _all_positions(tokens: Tensor) -> Tensor:
    return torch.arange(tokens.size(1), device=tokens.device)


def _kv(out: PassOutput) -> list[tuple[Tensor, Tensor]]:
    return [(kv.k.detach(), kv.v.detach()) for kv in out.kv]


class _Losses:
    """Collects the passes' losses, weights them, and runs the backward(s)."""

    def __init__(self, targets, backward: Optional[Backward], detach: bool, weights: list[float], denominators=None):
        self.scored = targets is not None
        self.backward = backward if self.scored else None
        self.per_pass = backward is not None and detach
        self.weights = [w / sum(weights) for w in weights]
        self.denominators = denominators
        self.losses: list[Tensor] = []
        self.total: Optional[Tensor] = None

    def add(self, out: PassOutput, targets: Optional[Tensor]) -> None:
        if not self.scored:
            return
        i = len(self.losses)
        if self.denominators is None:
            loss = mean_loss(out.token_loss, targets)
        else:
            loss = out.token_loss.sum() / self.denominators[i]
        loss = self.weights[i] * loss
        self.losses.append(mean_loss(out.token_loss.detach(), targets))
        if self.per_pass and loss.requires_grad:  # micro-step: this pass's graph is freed right here
            self.backward(loss, i == len(self.weights) - 1)
            loss = loss.detach()
        self.total = loss if self.total is None else self.total + loss

    def finish(self) -> None:
        if self.backward is not None and not self.per_pass:
            self.backward(self.total, True)

    def result(self, outs: list[PassOutput], positions: list[Tensor], merged: PassOutput, kv) -> StepResult:
        return StepResult(
            loss=self.total,
            pass_losses=self.losses,
            pass_token_losses=[o.token_loss.detach() for o in outs] if self.scored else [],
            pass_positions=positions,
            token_loss=merged.token_loss.detach() if self.scored else None,
            states=merged.states.detach(),
            gate_means=[o.gate_means for o in outs],
            logits=None if merged.logits is None else merged.logits.detach(),
            kv=kv,
        )
