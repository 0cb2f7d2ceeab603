"""The trainer's guards against a run that went wrong: non-finite parameters after an update,
and loss spikes (divergence). Both stop the run with exit code 3 (`TrainingHalted`)."""

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
