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

Workers. With K background workers (`data.num_workers`), worker k owns the
rank's streams s with (s div W) = k (mod K), i.e. every K-th stream of the rank,
and packs only their rows. For each batch every worker hands over its rows with
the states of the streams it moved; the trainer's process places them in the
batch by stream. A batch, and the state after it, is therefore the same for
every K (0 packs in the trainer's process), and a state resumes under any K.
Streamed hub data takes at most one worker: `datasets` would split each stream
among the torch workers by itself. Workers ignore stop signals (the trainer
saves first), so the loader stops them itself: on a DataError, on `close()`, and
at interpreter exit.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import signal
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from titan_lrt.data.mixture import Mixture
from titan_lrt.data.packing import row_packer
from titan_lrt.data.prepared import PreparedSplit, open_source
from titan_lrt.data.sources import DataError, Documents
from titan_lrt.data.streams import RawSource, StreamState, TextEncoder

MAX_NUM_WORKERS = 16
"""Most background workers a loader may use (data.num_workers; 0 packs in the training process).
Each worker is a process that owns whole streams, so a rank also has at most as many workers as
streams; past a few, the trainer's process assembling the batches is the limit."""


class BatchPart(NamedTuple):
    """What one worker hands over per batch: its rows, in batch order, and its streams' new states."""

    worker: int
    batch: int  # index of the batch since the loader (re)started
    # (rows of this worker, seq_len + 1) int32, as numpy: pickled through the worker's pipe, where a tensor
    # would go through shared memory, whose cost per tensor made workers 2-5x slower on prepared data
    rows: np.ndarray
    states: dict[str, dict]  # stream id -> StreamState dict, for the streams these rows moved


class PackedRowsDataset(IterableDataset):
    """The rows of one rank, as `BatchPart`s of each worker (`parts`); `state_dict`/`load_state_dict` as above.
    `TokenBatchLoader` assembles the parts into batches."""

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

    def seek(self, streams: dict[str, dict], next_row: int) -> None:
        """Put this rank's streams at `streams` (this rank's own, as in `state_dict`) and its next row at
        `next_row`: where a loader that stopped its workers goes on."""
        self._states = {s: StreamState.from_dict(copy.deepcopy(streams[str(s)])) for s in self.owned_streams}
        self._next_row = next_row

    @property
    def next_row(self) -> int:
        """This rank's next global row (where iteration starts)."""
        return self._next_row

    def row_streams(self, first_row: int) -> list[int]:
        """The streams of the rows of the batch whose first row is global row `first_row`."""
        num_streams, world = self.settings["num_streams"], self.dp_world_size
        return [(first_row + j * world) % num_streams for j in range(self.local_batch_size)]

    def worker_of(self, stream: int, num_workers: int) -> int:
        """The worker (of `num_workers`, at least 1) that packs `stream`: every num_workers-th owned stream."""
        return (stream // self.dp_world_size) % num_workers

    def __iter__(self) -> Iterator[BatchPart | DataError]:
        info = get_worker_info()
        return self.parts(0, 1) if info is None else self.parts(info.id, info.num_workers)

    def parts(self, worker: int, num_workers: int) -> Iterator[BatchPart | DataError]:
        """The rows of `worker`'s streams, batch by batch, from the current state on. Bad data raises a
        DataError; in a loader worker it ends the parts as an item instead, which the trainer raises as it
        is (see TokenBatchLoader), where torch would wrap it in the worker's traceback."""
        row_len = self.settings["seq_len"] + 1
        streams: dict = {}  # opened on first use: each reads ahead a little
        for batch in itertools.count():
            mine = [s for s in self.row_streams(self._next_row) if self.worker_of(s, num_workers) == worker]
            try:
                rows = [self._pack(self._open(streams, s), row_len) for s in mine]
            except DataError as err:
                if get_worker_info() is None:
                    raise
                yield err
                return
            self._next_row += self.local_batch_size * self.dp_world_size
            rows = torch.stack(rows).numpy() if rows else np.empty((0, row_len), dtype=np.int32)
            yield BatchPart(worker, batch, rows, {str(s): _state_copy(self._states[s]) for s in set(mine)})

    def _open(self, streams: dict, stream: int):
        if stream not in streams:
            streams[stream] = self.source.open_stream(
                self.settings["num_streams"], stream, self.settings["seed"], self._states[stream]
            )
        return streams[stream]

    def _initial_state(self) -> dict:
        streams = {str(s): StreamState().to_dict() for s in range(self.settings["num_streams"])}
        return {**self.settings, "streams": streams}


class TokenBatchLoader:
    """What the trainer iterates: `(inputs, targets)` long tensors of shape (local_batch_size, seq_len).

    With `num_workers` >= 1 it runs a torch `DataLoader` whose workers pack disjoint sets of
    streams (see the module docstring) and assembles each batch from their parts in a fixed
    order; with 0 it packs in this process. `state_dict()` is the state after the last batch
    handed out (see the module docstring), the same for every worker count;
    `load_state_dict()` restarts the loader from a (merged) state. `close()` stops the workers
    (done at interpreter exit for the loaders still open).
    """

    def __init__(self, dataset: PackedRowsDataset, *, num_workers: int, pin_memory: bool = False):
        check_num_workers(num_workers, dataset)
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._parts: Iterator | None = None
        self._restart()
        _OPEN_LOADERS.add(self)

    def __iter__(self) -> TokenBatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._parts is None:
            self._parts = self._start()
        parts = [self._next_part(worker) for worker in range(max(self.num_workers, 1))]
        streams = self.dataset.row_streams(self._next_row)
        batch = self._assemble(parts, streams)
        for part in parts:
            self._streams.update(part.states)
        self._next_row += self.dataset.local_batch_size * self.dataset.dp_world_size
        self._batch += 1
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if self.pin_memory:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def state_dict(self) -> dict:
        return {**self.dataset.settings, "streams": dict(self._streams)}

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

    def close(self) -> None:
        """Stop the workers now. They ignore stop signals (see below), so one left running would block
        an interpreter exit that waits for it. Iterating again restarts after the last batch handed out."""
        if self._parts is not None:
            self._stop()
            self.dataset.seek(self._streams, self._next_row)

    def _next_part(self, worker: int) -> BatchPart:
        try:
            part = next(self._parts)
        except DataError:  # met in this process
            self.close()
            raise
        if isinstance(part, DataError):  # met in a worker
            self.close()
            raise part
        if (part.worker, part.batch) != (worker, self._batch):  # the DataLoader serves its workers in turn
            raise RuntimeError(
                f"loader expected batch {self._batch} of worker {worker}, got batch {part.batch} of worker "
                f"{part.worker}; the torch DataLoader no longer returns its workers' items in order"
            )
        return part

    def _assemble(self, parts: list[BatchPart], streams: list[int]) -> torch.Tensor:
        """The batch: row j comes from the part of the worker that owns stream `streams[j]`, in order."""
        if len(parts) == 1:
            return torch.from_numpy(parts[0].rows).long()
        batch = torch.empty(len(streams), self.dataset.settings["seq_len"] + 1, dtype=torch.long)
        for part in parts:
            positions = [j for j, s in enumerate(streams) if self.dataset.worker_of(s, self.num_workers) == part.worker]
            if positions:
                batch[positions] = torch.from_numpy(part.rows).long()
        return batch

    def _start(self) -> Iterator:
        if self.num_workers == 0:
            return self.dataset.parts(0, 1)
        return iter(
            DataLoader(
                self.dataset,
                batch_size=None,
                collate_fn=_as_is,  # parts go through unchanged (the default would convert the states)
                num_workers=self.num_workers,
                worker_init_fn=_leave_stop_signals_to_the_trainer,
            )
        )

    def _stop(self) -> None:
        shutdown = getattr(self._parts, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._parts, self._batch = None, 0

    def _restart(self) -> None:
        """Start over from the dataset's state (just loaded)."""
        self._stop()
        self._streams = copy.deepcopy(self.dataset.state_dict()["streams"])
        self._next_row = self.dataset.next_row


_OPEN_LOADERS: weakref.WeakSet[TokenBatchLoader] = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """Stop the workers of loaders still referenced at exit. Registered after torch's and
    multiprocessing's exit hooks, so it runs before them: theirs would skip the shutdown and then
    wait for the (signal-ignoring) workers forever."""
    for loader in list(_OPEN_LOADERS):
        loader.close()


def check_num_workers(num_workers: int, dataset: PackedRowsDataset) -> None:
    """At most `MAX_NUM_WORKERS`, no more than the streams the rank owns (a worker owns whole streams),
    and one for streamed (hub) data."""
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or not 0 <= num_workers <= MAX_NUM_WORKERS:
        raise ValueError(f"num_workers must be an integer in [0, {MAX_NUM_WORKERS}], got {num_workers!r}")
    if num_workers > 1 and dataset.source.streaming:
        raise ValueError(
            f"data.num_workers={num_workers} with streamed data: the datasets library splits a stream among "
            "torch workers by itself, so streamed data is read by at most 1 worker; set data.num_workers=1, or "
            "prepare the data (tools/prepare_data.py) or use local files to read with more"
        )
    owned = len(dataset.owned_streams)
    if num_workers > owned:
        raise ValueError(
            f"data.num_workers={num_workers} is more than the {owned} streams this rank packs "
            f"(data.num_streams={dataset.settings['num_streams']} over {dataset.dp_world_size} data-parallel ranks); "
            "a worker packs whole streams: lower data.num_workers (or, for a new run, raise data.num_streams)"
        )


def _as_is(part):
    return part


def _state_copy(state: StreamState) -> dict:
    """A stream's state as a dict that later packing does not change (the packer mutates `source` in place)."""
    state = state.to_dict()
    if state["source"] is not None:
        state["source"] = copy.deepcopy(state["source"])
    return state


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


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
