"""The trainer's guards against a run that went wrong: non-finite parameters after an update,
and loss spikes (divergence), which stop the run with exit code 3 (`TrainingHalted`); and an
LRT pathway that does nothing or harm, which only warns (`PathwayMonitor`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

SPIKE_ACTIONS = ("off", "warn", "stop", "rollback")
"""training.spike_action: ignore, log a warning, stop the run, or reload the last good
checkpoint and continue on the batches after the spike."""

SPIKE_MEAN_DECAY = 0.98
"""The running mean is an exponential average over roughly the last 50 unflagged losses:
slow enough that a loss climbing over tens of steps still stands out against it."""

MAX_ROLLBACKS_IN_A_ROW = 3
"""Rollbacks without getting past the previous spike before the run stops: a spike that
skipping data does not cure (a learning rate far too high) would otherwise loop forever."""


class TrainingHalted(RuntimeError):
    """The run stopped itself (non-finite values, a loss spike); the process exits with code 3."""


class NonFiniteError(TrainingHalted):
    """The loss, the gradient norm or the parameters became NaN/inf."""


class LossSpikeError(TrainingHalted):
    """The loss stayed far above its running mean (training.spike_action = "stop")."""


def nonfinite_count(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 when some local parameter (shard) holds NaN/inf, else 0.0 (a tensor, for an all-reduce).

    One fused max-|x| over all tensors: NaN and inf propagate, huge finite values do not overflow."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in parameters]
    if not local:
        return torch.zeros(())
    device = local[0].device  # an FSDP rank can hold empty shards: the flag must still be on its device
    local = [t.detach() for t in local if t.numel()]
    if not local:
        return torch.zeros((), device=device)
    peak = torch.stack(torch._foreach_norm(local, math.inf)).max()
    return (~torch.isfinite(peak)).float()


class LossSpikeGuard:
    """A loss above `factor` x the running mean of the earlier unflagged losses is flagged;
    `patience` flagged steps in a row are a spike. Flagged losses stay out of the mean."""

    def __init__(self, factor: float, patience: int):
        self.factor, self.patience = factor, patience
        self.ema, self.weight = 0.0, 0.0  # bias-corrected like Adam's moments: mean = ema / weight
        self.flagged = 0
        self.first_flagged: int | None = None

    @property
    def mean(self) -> float | None:
        return self.ema / self.weight if self.weight else None

    def observe(self, step: int, loss: float) -> bool:
        """Record the loss of `step`; True when it completes a spike."""
        if not math.isfinite(loss):  # training.nonfinite = "skip" handles those
            return False
        mean = self.mean
        if mean is not None and loss > self.factor * mean:
            self.flagged += 1
            self.first_flagged = self.first_flagged or step
            return self.flagged >= self.patience
        self.flagged, self.first_flagged = 0, None
        self.ema = SPIKE_MEAN_DECAY * self.ema + (1 - SPIKE_MEAN_DECAY) * loss
        self.weight = SPIKE_MEAN_DECAY * self.weight + (1 - SPIKE_MEAN_DECAY)
        return False

    @property
    def suspicious(self) -> bool:
        """Some recent losses are flagged: the weights may be going bad (do not checkpoint them)."""
        return self.flagged > 0

    def reset_flags(self) -> None:
        self.flagged, self.first_flagged = 0, None


PATHWAY_MARGIN = 0.001
"""The pathway warning's margin: the smoothed merged loss must lie at least this fraction of the
smoothed pass-0 loss below it (0.1%, e.g. 0.003 nats at a loss of 3). A working pathway keeps
the merged loss clearly below pass 0's; a pathway doing nothing leaves them equal up to noise."""

PATHWAY_REARM_MARGIN = 2 * PATHWAY_MARGIN
"""After a warning, the check re-arms only once the merged loss is this far below pass 0's:
a gap hovering at the margin warns once, not at every other logged step."""

PATHWAY_EMA_DECAY = 0.9
"""Smoothing of the logged losses: an exponential average over about the last 10 logged steps."""


class PathwayMonitor:
    """The LRT early warning: fed the per-pass losses of each logged step, it flags a pathway
    that does nothing or harm, i.e. a smoothed merged loss not below the smoothed pass-0 loss
    by `PATHWAY_MARGIN` (relative), from `start_step` on. It warns once, and again only after
    the gap recovered past `PATHWAY_REARM_MARGIN`."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.pass0, self.merged, self.weight = 0.0, 0.0, 0.0  # bias-corrected EMAs: value / weight
        self.failing = False
        """The check fails at the latest logged step (what lrt/pathway_warning logs)."""
        self.warned = False

    def observe(self, step: int, pass0: float, merged: float) -> str | None:
        """Record a logged step's pass-0 and merged losses; the warning to print, once, or None."""
        if not (math.isfinite(pass0) and math.isfinite(merged)):
            return None
        d = PATHWAY_EMA_DECAY
        self.pass0, self.merged = d * self.pass0 + (1 - d) * pass0, d * self.merged + (1 - d) * merged
        self.weight = d * self.weight + (1 - d)
        smooth0, smooth_merged = self.pass0 / self.weight, self.merged / self.weight
        gap = (smooth0 - smooth_merged) / abs(smooth0) if smooth0 else 0.0  # > 0: the pathway helps
        self.failing = step >= self.start_step and gap < PATHWAY_MARGIN
        if self.warned and gap >= PATHWAY_REARM_MARGIN:
            self.warned = False
        if not self.failing or self.warned:
            return None
        self.warned = True
        return (
            f"LRT pathway warning at step {step}: the merged loss {smooth_merged:.4f} is not below pass 0's "
            f"{smooth0:.4f} by {PATHWAY_MARGIN:.1%} (smoothed), so the recurrent pathway does nothing or harm "
            "and the run may be stuck where the baseline would not be. Try lrt.gamma_init = 0 (if raised), "
            "lrt.gamma_warmup_steps / lrt.gate_warmup_steps, lrt.start_step, or optimizer.lrt_lr_scale < 1."
        )
