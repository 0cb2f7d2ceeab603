"""Graceful stop on SIGTERM / SIGUSR1 (cluster preemption, time limits).

The handler only records the request; the trainer finishes the step in flight,
agrees with the other ranks that one of them was asked to stop, saves a
checkpoint and exits with code 0, so that a requeued job resumes from it.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger("titan_lrt")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a stop signal (a collective: call it on every rank)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
