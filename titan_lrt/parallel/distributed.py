"""Process group set-up and a clean shutdown."""

from __future__ import annotations

import datetime
import os
import random
import sys
import threading
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
        raise RuntimeError('training.device = "cuda" but no CUDA device is available')
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
        _watch_for_failed_ranks(rank)
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


# A failing rank leaves its rank under this key of the process group's store; the
# others poll for it and stop too, instead of waiting in their next collective
# (NCCL: until the process-group timeout) for a rank that is gone.
FAILED_RANK_KEY = "titan_lrt/failed_rank"
WATCH_INTERVAL_S = 1.0
_stop_watching = threading.Event()


def _watch_for_failed_ranks(rank: int) -> None:
    try:
        store = dist.distributed_c10d._get_default_store().clone()  # its own connection: polled from a thread
    except Exception:  # noqa: BLE001 - a store without clone(): no watch, the collectives' timeout still holds
        return
    threading.Thread(target=_watch, args=(store, rank), name="titan_lrt-failed-rank-watch", daemon=True).start()


def _watch(store, rank: int) -> None:
    while not _stop_watching.wait(WATCH_INTERVAL_S):
        try:
            if not store.check([FAILED_RANK_KEY]):
                continue
            failed = store.get(FAILED_RANK_KEY).decode()
        except Exception:  # noqa: BLE001 - the store is gone (its host exited): the collectives will tell
            return
        if _stop_watching.is_set() or failed == str(rank):
            return
        print(f"[rank{rank}] rank {failed} failed; stopping this rank too", flush=True)
        sys.stderr.flush()
        os._exit(1)


def _announce_failure(rank: int) -> None:
    try:
        dist.distributed_c10d._get_default_store().set(FAILED_RANK_KEY, str(rank))
    except Exception:  # noqa: BLE001 - best effort: the others then fail in their next collective
        pass


def shutdown(exit_code: int) -> None:
    """Leave the process group and exit without running interpreter teardown.

    gloo processes can abort at interpreter exit after an FSDP backward; tearing
    the group down, flushing and exiting immediately avoids that. Only a clean
    exit (code 0, every rank finished the same steps) waits for the others in a
    barrier. A failing rank leaves at once and tells the others through the store
    (they stop within WATCH_INTERVAL_S), so that nobody waits for the
    process-group timeout in a collective or barrier the failed rank never reaches.
    """
    if dist.is_initialized():
        if exit_code == 0:
            try:
                dist.barrier()  # still watched: a rank failing now stops this one too
            finally:
                _stop_watching.set()
                dist.destroy_process_group()
        else:
            _stop_watching.set()
            _announce_failure(dist.get_rank())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
