"""The training data loader: one global row sequence, split across data-parallel ranks.

Global row g is row `g div N` of virtual stream `g mod N` (N = `num_streams`,
see `streams.py`); this sequence does not depend on the world size W. Rank r
of W takes exactly the rows g with g = r (mod W), in order, and yields them
`local_batch_size` at a time, so a step with global batch G = W * local rows
consumes global rows [kG, (k+1)G). W must divide N: a rank then owns whole
streams (those s with s = r mod W).

Resume and resharding. `state_dict()` of a rank holds the state of the
streams it owns, keyed by stream id (as str), plus the settings that must not
change across a resume:

    {"num_streams": N, "seq_len": T, "packing": "...", "seed": S,
     "streams": {"0": {"epoch", "doc", "offset", "rows", "tokens_read",
                       "tokens_dropped", "source"}, "2": {...}, ...}}

A mixture adds "mixture": {source: weight} to the settings, and keeps each
source's position inside its streams' states (see `mixture.py`).
`merge_loader_states` unions the dicts of all ranks; `load_state_dict` takes
that union (any world size dividing N) and keeps the streams the rank owns.
The global position is the total number of rows of all streams, so the dicts
of every rank are needed, taken at the same step.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import datasets
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_lrt.data.mixture import Mixture
from titan_lrt.data.packing import row_packer
from titan_lrt.data.prepared import PreparedSplit, open_source
from titan_lrt.data.sources import DataError, Documents
from titan_lrt.data.streams import RawSource, StreamState, TextEncoder

NUM_WORKERS = (0, 1)
"""Background tokenization workers a loader may use (data.num_workers): each stream is packed
sequentially, and one worker already tokenizes off the training process."""


class PackedRowsDataset(IterableDataset):
    """Yields the (inputs, targets) batches of one rank; `state_dict`/`load_state_dict` as above."""

    def __init__(
        self,
        documents: Documents | RawSource | PreparedSplit | Mixture,
        tokenizer: TextEncoder,
        *,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        num_streams: int,
        packing: str,
        seed: int,
    ):
        _check_positive_int("seq_len", seq_len)
        _check_positive_int("local_batch_size", local_batch_size)
        _check_positive_int("dp_world_size", dp_world_size)
        _check_positive_int("num_streams", num_streams)
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank must be an integer in [0, {dp_world_size}), got {dp_rank!r}")
        if num_streams % dp_world_size:
            raise ValueError(
                f"num_streams ({num_streams}) must be a multiple of dp_world_size ({dp_world_size}) "
                "so that each rank owns whole streams; pick num_streams divisible by every "
                "world size the run may use (e.g. 64)"
            )
        self._pack = row_packer(packing)
        # raw documents tokenized on the fly, or any source that opens streams (prepared, mixture)
        self.source = RawSource(documents, tokenizer) if isinstance(documents, Documents) else documents
        self.source.check_streams(num_streams)
        self.documents = documents
        self.tokenizer = tokenizer
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.settings = {"num_streams": num_streams, "seq_len": seq_len, "packing": packing, "seed": seed}
        if isinstance(self.source, Mixture):  # a resume must use the same sources and weights
            self.settings["mixture"] = self.source.weights
        self.load_state_dict(self._initial_state())

    @property
    def owned_streams(self) -> range:
        return range(self.dp_rank, self.settings["num_streams"], self.dp_world_size)

    def state_dict(self) -> dict:
        streams = {str(s): self._states[s].to_dict() for s in self.owned_streams}
        return {**self.settings, "streams": streams}

    def load_state_dict(self, state: dict) -> None:
        """Take the streams this rank owns from `state` (the merged states of all ranks)."""
        for key in sorted((set(self.settings) | set(state)) - {"streams"}):
            if state.get(key) != self.settings.get(key):
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader has "
                    f"{key}={self.settings.get(key)!r}; resume with the same {key}"
                )
        num_streams = self.settings["num_streams"]
        streams = {int(s): StreamState.from_dict(v) for s, v in state["streams"].items()}
        if set(streams) != set(range(num_streams)):
            missing = sorted(set(range(num_streams)) - set(streams))
            raise ValueError(
                f"loader state lacks streams {missing} of {num_streams}; load the states of all "
                "ranks merged with merge_loader_states"
            )
        next_row = sum(s.rows for s in streams.values())
        for s, stream_state in streams.items():
            expected = (next_row - s + num_streams - 1) // num_streams
            if stream_state.rows != expected:
                raise ValueError(
                    f"loader state is not at a global row boundary: stream {s} produced "
                    f"{stream_state.rows} rows, expected {expected} after {next_row} global rows; "
                    "take the states of all ranks at the same step"
                )
        self._states = {s: streams[s] for s in self.owned_streams}
        # this rank's first global row at or after next_row
        self._next_row = next_row + (self.dp_rank - next_row) % self.dp_world_size

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("PackedRowsDataset supports at most one DataLoader worker")
        num_streams, row_len = self.settings["num_streams"], self.settings["seq_len"] + 1
        streams: dict = {}  # opened on first use: each reads ahead a little
        while True:
            try:
                batch = self._next_batch(streams, num_streams, row_len)
            except DataError as err:
                if info is None:
                    raise
                yield err  # a worker hands bad data to the trainer to raise as it is (see TokenBatchLoader)
                return
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def _next_batch(self, streams: dict, num_streams: int, row_len: int) -> torch.Tensor:
        rows = []
        for _ in range(self.local_batch_size):
            s = self._next_row % num_streams
            if s not in streams:
                streams[s] = self.source.open_stream(num_streams, s, self.settings["seed"], self._states[s])
            rows.append(self._pack(streams[s], row_len))
            self._next_row += self.dp_world_size
        return torch.stack(rows).long()

    def _initial_state(self) -> dict:
        streams = {str(s): StreamState().to_dict() for s in range(self.settings["num_streams"])}
        return {**self.settings, "streams": streams}


class TokenBatchLoader:
    """What the trainer iterates: `(inputs, targets)` long tensors of shape (local_batch_size, seq_len).

    Wraps a `StatefulDataLoader` (at most one worker, which tokenizes in the
    background). `state_dict()` is the dataset state of the last batch handed
    out (see the module docstring); `load_state_dict()` restarts the loader
    from a (merged) state.
    """

    def __init__(self, dataset: PackedRowsDataset, *, num_workers: int, pin_memory: bool = False):
        if num_workers not in NUM_WORKERS:
            raise ValueError(
                f"num_workers must be 0 or 1, got {num_workers!r}: each stream is packed "
                "sequentially, and one worker already tokenizes off the training process"
            )
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._restart()

    def __iter__(self) -> TokenBatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self._loader)
        batch = next(self._batches)
        if isinstance(batch, DataError):  # raised in the worker, where torch would wrap it in a traceback
            self._stop_worker()
            raise batch
        return batch

    def state_dict(self) -> dict:
        if self._batches is None:
            return self.dataset.state_dict()
        return _dataset_state(self._loader.state_dict(), self.num_workers)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._restart()

    def stats(self) -> dict:
        """Token counters of this rank's streams; `waste_fraction` = dropped / read."""
        streams = self.state_dict()["streams"].values()
        read = sum(s["tokens_read"] for s in streams)
        dropped = sum(s["tokens_dropped"] for s in streams)
        stats = {"tokens_read": read, "tokens_dropped": dropped, "waste_fraction": dropped / read if read else 0.0}
        if isinstance(self.dataset.source, Mixture):
            stats["tokens_read_by_source"] = self.dataset.source.tokens_read_by_source(streams)
        return stats

    def _stop_worker(self) -> None:
        """Now, not when the iterator is collected: the worker ignores stop signals (see below), so one
        left running would block an interpreter exit that waits for it."""
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._batches = None

    def _restart(self) -> None:
        self._loader = StatefulDataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=_leave_stop_signals_to_the_trainer if self.num_workers else None,
        )
        self._batches = None


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A stop signal sent to the whole process group (torchrun, SLURM) must not kill the
    tokenizing worker: the trainer finishes its step and saves first; the worker ends
    with the trainer."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def merge_loader_states(states: Iterable[dict]) -> dict:
    """Union of the loader states of several ranks (same settings, disjoint or equal streams)."""
    merged: dict | None = None
    for state in states:
        if merged is None:
            merged = {**{k: v for k, v in state.items() if k != "streams"}, "streams": {}}
        for key in sorted((set(merged) | set(state)) - {"streams"}):
            if state.get(key) != merged.get(key):
                raise ValueError(
                    f"cannot merge loader states with {key}={merged.get(key)!r} and {key}={state.get(key)!r}"
                )
        for stream, stream_state in state["streams"].items():
            previous = merged["streams"].setdefault(str(stream), stream_state)
            if previous != stream_state:
                raise ValueError(f"loader states disagree on stream {stream}")
    if merged is None:
        raise ValueError("no loader states to merge")
    return merged


def build_dataloader(
    source: str | Path | Sequence[str | Path] | Mapping[str, float] | datasets.Dataset | datasets.IterableDataset,
    *,
    tokenizer: TextEncoder,
    seq_len: int,
    local_batch_size: int,
    split: str,
    text_column: str,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    num_streams: int,
    packing: str,
    seed: int,
    num_workers: int,
    streaming: bool,
    hub_config: str | None = None,
    txt_sample_by: str = "document",
    pin_memory: bool = False,
) -> TokenBatchLoader:
    """A resumable loader of packed token batches for one data-parallel rank.

    `source`: a prepared folder (`prepared.py`, read pre-tokenized), a local
    file/directory, a hub dataset name (with `streaming=True`) or a loaded dataset
    (see `sources.py`), or a mixture {source: weight} of such paths (`mixture.py`);
    `packing` is one of `PACKING_MODES`. The arguments the config sets (data.*, training.seed)
    have no defaults here: the config's are the only ones.
    """
    options = {
        "split": split,
        "tokenizer": tokenizer,
        "text_column": text_column,
        "streaming": streaming,
        "hub_config": hub_config,
        "txt_sample_by": txt_sample_by,
    }
    if isinstance(source, Mapping):
        documents = Mixture({name: open_source(name, **options) for name in source}, source)
    else:
        documents = open_source(source, **options)
    dataset = PackedRowsDataset(
        documents,
        tokenizer,
        seq_len=seq_len,
        local_batch_size=local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        num_streams=num_streams,
        packing=packing,
        seed=seed,
    )
    return TokenBatchLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)


def _dataset_state(loader_state: dict, num_workers: int) -> dict:
    """The dataset's state inside a `StatefulDataLoader` state (torchdata 0.11 layout)."""
    try:
        if num_workers == 0:
            return loader_state["dataset_state"]
        return loader_state["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"]
    except KeyError as err:
        raise RuntimeError(f"unexpected StatefulDataLoader state layout (missing {err}); torchdata version?") from err


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
