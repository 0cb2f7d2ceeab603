"""Process group set-up and a clean shutdown."""

from __future__ import annotations

import datetime
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")
"""What `init_distributed` trains on ("auto": cuda when available)."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, device: str, timeout_s: float) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU).

    A single process (WORLD_SIZE unset or 1) runs without a process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("training.device = \"cuda\" but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a new tensor (`t` itself in a single process)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def shutdown(exit_code: int) -> None:
    """Leave the process group and exit without running interpreter teardown.

    gloo processes can abort at interpreter exit after an FSDP backward; tearing
    the group down, flushing and exiting immediately avoids that.
    """
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
