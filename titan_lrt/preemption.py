"""Graceful stop on SIGTERM / SIGUSR1 (cluster preemption, time limits) and Ctrl-C.

The handler only records the request; the trainer finishes the step in flight,
agrees with the other ranks that one of them was asked to stop, saves a
checkpoint and exits with code 0, so that a requeued job resumes from it.
A second Ctrl-C (SIGINT) aborts at once, with exit code 130, saving nothing.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger("titan_lrt")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ABORT_EXIT_CODE = 128 + signal.SIGINT  # the shell's convention for a process killed by Ctrl-C


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self.interrupts = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # os.write, not logging: a handler can interrupt the logging module holding its lock
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                os.write(2, b"second Ctrl-C: aborting now, without saving\n")
                os._exit(ABORT_EXIT_CODE)
            os.write(2, b"Ctrl-C: finishing the step, saving a checkpoint and exiting (Ctrl-C again aborts)\n")
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a stop signal (a collective: call it on every rank)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
