"""Training schedules of the LRT (DESIGN 2.4): interleaved, Jacobi, and off.

Each schedule runs the passes of one step on a batch and returns a
`StepResult`. When a `backward` callable is given, the schedule also runs the
backward: once on the total loss, or -- with `lrt.detach_buffer`, where passes
do not exchange gradients -- after every pass as its own micro-step, which frees
each pass's activations before the next pass starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from titan_lrt.model.buffer import SharedBuffer, interleave_groups
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
    """Per pass, the positions it computed (all T for full passes)."""

    token_loss: Optional[Tensor]
    """(B, T) merged per-position loss: each position scored by the last pass that computed it."""

    states: Tensor
    """(B, T, dim) merged source states (detached)."""

    gate_means: list[list[Optional[Tensor]]]
    """Per pass, per layer, the mean of each gate."""

    logits: Optional[Tensor] = None
    """(B, T, vocab) merged logits, without targets only."""

    kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """Per layer merged (K, V) in position order, when asked (prefill for decoding)."""


def run_schedule(
    model: Transformer,
    tokens: Tensor,
    targets: Optional[Tensor] = None,
    backward: Optional[Backward] = None,
    return_kv: bool = False,
    loss_denominators: Optional[Sequence[float]] = None,
) -> StepResult:
    """Run the schedule chosen by `model.args.lrt.mode` on a (B, T) batch.

    Each pass's loss is the sum of its per-position losses divided by its
    entry of `loss_denominators` (default: the number of scored targets it
    computed here, i.e. the mean); a data-parallel trainer passes global counts.
    """
    mode = model.args.lrt.mode
    schedule = {"interleaved": interleaved, "jacobi": jacobi}.get(mode, baseline)
    return schedule(model, tokens, targets, backward, return_kv, loss_denominators)


def baseline(model, tokens, targets=None, backward=None, return_kv=False, loss_denominators=None) -> StepResult:
    """One full pass (LRT off, or zero memory)."""
    run = _Losses(targets, backward, detach=False, weights=[1.0], denominators=loss_denominators)
    out = model(tokens, targets)
    run.add(out, targets)
    run.finish()
    return run.result([out], [_all_positions(tokens)], merged=out, kv=_kv(out) if return_kv else [])


def jacobi(model, tokens, targets=None, backward=None, return_kv=False, loss_denominators=None) -> StepResult:
    """K full passes; pass k reads the memory shift_right(s^{k-1}), pass 0 zero memory."""
    lrt = model.args.lrt
    K = lrt.jacobi_passes
    run = _Losses(targets, backward, lrt.detach_buffer, lrt.jacobi_weights or [1.0] * K, loss_denominators)
    positions = _all_positions(tokens)
    keep = memory_keep_mask(tokens, positions, model.args.bos_token_id, lrt.reset_at_bos)
    memory, outs = None, []
    for _ in range(K):
        out = model(tokens, targets, memory=memory)
        run.add(out, targets)
        outs.append(out)
        states = out.states.detach() if lrt.detach_buffer else out.states
        memory = apply_reset(shift_right(states), keep)
    run.finish()
    return run.result(outs, [positions] * K, merged=outs[-1], kv=_kv(outs[-1]) if return_kv else [])


def interleaved(model, tokens, targets=None, backward=None, return_kv=False, loss_denominators=None) -> StepResult:
    """Pass 0 over all positions builds the shared buffer; then S subset passes refine it."""
    lrt = model.args.lrt
    S = lrt.num_subsets
    run = _Losses(targets, backward, lrt.detach_buffer, [lrt.pass0_weight] + [1.0] * S, loss_denominators)

    # Pass 0: all T positions, zero memory; its K/V and source states fill the buffer.
    out0 = model(tokens, targets)
    run.add(out0, targets)
    buffer = SharedBuffer(model, tokens, out0, S, detach=lrt.detach_buffer)
    outs = [out0]

    # Refinement: pass i computes P_i = {t : t mod S == i} with memory from the latest
    # merged states, writes its fresh K/V and states back, and pass i + 1 reads them.
    for i in range(S):
        if lrt.kv_refresh:
            buffer.refresh(i)
        subset_targets = None if targets is None else targets[:, i::S]
        out = model(
            tokens[:, i::S],
            subset_targets,
            positions=buffer.positions[i],
            memory=buffer.memory(i),
            keys=buffer.keys_for(i),
        )
        buffer.write(i, out)
        run.add(out, subset_targets)
        outs.append(out)
    run.finish()

    T = tokens.size(1)
    merged = PassOutput(
        states=buffer.merged_states(),
        kv=[],
        gate_means=[],
        logits=None if targets is not None else interleave_groups([o.logits for o in outs[1:]], T, dim=1),
        token_loss=None if targets is None else interleave_groups([o.token_loss for o in outs[1:]], T, dim=1),
    )
    positions = [_all_positions(tokens)] + buffer.positions
    return run.result(outs, positions, merged, kv=buffer.merged_kv() if return_kv else [])


# ---- internals ---------------------------------------------------------------------


def mean_loss(token_loss: Tensor, targets: Tensor) -> Tensor:
    """Mean over the positions whose target is scored."""
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return token_loss.sum() / count


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
        if self.per_pass:  # micro-step: this pass's graph is freed right here
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
