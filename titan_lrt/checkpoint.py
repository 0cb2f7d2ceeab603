"""Distributed checkpointing with DCP: save, resume (also on another world size), keep the last k.

Layout of the checkpoint folder:

    step-00000100/            a complete checkpoint
        .metadata             DCP metadata (written by DCP's coordinator once every rank wrote)
        __0_0.distcp ...      DCP data, one file per rank
        config.toml           the resolved run config (rank 0)
        complete.json         the marker: step, world size, size and CRC-32 of every file above
    step-00000200.partial/    a save in flight, or one that a crash interrupted

Atomicity: all ranks write into `step-N.partial`; only when DCP has finished on
every rank (for an async save: when its future has completed) does rank 0
write the marker and rename the folder to `step-N` (one atomic rename). A
folder is complete when it has that exact name, the marker and files of the
recorded sizes; it is loadable when, in addition, every file has the recorded
checksum and the metadata reads. "latest" is the newest loadable step: newer
ones that fail are skipped with a warning naming the folder and the reason.
`keep_latest_k` only ever deletes older complete checkpoints, after the new one
is complete, by renaming each to `step-N.deleting` before removing it; the next
`load` removes such leftovers and interrupted saves.

Keys: the state dict of each state is saved under its name (`model.<fqn>`,
`optimizer.state.<fqn>.exp_avg`, ...; DCP flattens nested dicts). A state that
differs per rank (`PerRankStateful`: the data loader, the RNG streams) is saved
as `<name>.rank<r>`, rank r's state as a uint8 tensor of JSON text: DCP lets
every rank write its own keys and read those of every other rank, so on load
each rank gets the states of all saved ranks, in rank order, and merges them.
This is what makes a resume on a different world size possible.

Trust: nothing of ours is pickled. DCP's `.metadata` is a pickle and DCP stores
non-tensor values (the scheduler's ints, ...) with torch.save; both are read
here through restricted unpicklers (`_MetadataUnpickler`, `torch.load(weights_only=True)`),
and only for the folder actually loaded, after its checksums matched.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)
# DCP warns on every single-process save and load (also from the async writer thread), even
# when asked for exactly that with no_dist=True.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)", category=UserWarning)

_ASYNC_WRITERS = {
    "disabled": None,
    "async": AsyncCheckpointerType.THREAD,
    "async_process": AsyncCheckpointerType.PROCESS,
}
ASYNC_MODES = tuple(_ASYNC_WRITERS)
"""checkpoint.async_mode: see `CheckpointManager`."""
MARKER = "complete.json"
RUN_CONFIG = "config.toml"
"""The resolved run config, written into every step folder (it rebuilds the model without the trainer)."""
RUN_TOKENIZER = "tokenizer.json"
"""The tokenizer's file name: the trainer copies the run's tokenizer to <job.dump_folder>/tokenizer.json,
so that a checkpoint carries everything needed to use the model; converted checkpoints and exported
folders hold one under the same name."""
MODEL = "model"
METADATA = ".metadata"
"""DCP's metadata file (a pickle; see `_MetadataUnpickler`)."""
CHECKSUM = "crc32"
"""The checksum `complete.json` records per file: zlib's CRC-32, fast enough to verify every load."""
_CHUNK = 16 * 2**20
_STEP_FOLDER = re.compile(r"step-(\d{8})(.*)")
_PARTIAL = ".partial"
_DELETING = ".deleting"
_REPLACED = ".replaced"
_LEFTOVER_SUFFIXES = (_PARTIAL, _DELETING, _REPLACED)


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- states -------------------------------------------------------------------------------


class ModelWrapper:
    """The model's state via DCP's state-dict API: the same keys for plain and FSDP2 (DTensor)
    modules, without compile/AC wrapper prefixes, and resharded on load."""

    def __init__(self, model_parts: nn.Module | Sequence[nn.Module]):
        self.model_parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for part in self.model_parts:
            state.update(get_model_state_dict(part))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # several parts each take their own keys from the union
        options = StateDictOptions(strict=len(self.model_parts) == 1)
        for part in self.model_parts:
            set_model_state_dict(part, state_dict, options=options)


class PerRankStateful(ABC):
    """A state that differs per rank: each rank saves its own; on load each rank gets all saved ones."""

    @abstractmethod
    def state_dict(self) -> Any:
        """This rank's state: JSON types (dict, list, str, int, float, bool, None) and CPU tensors."""

    @abstractmethod
    def load_rank_states(self, states: list[Any], rank: int) -> None:
        """Restore from the states of all saved ranks (`states[r]` is saved rank r's); `rank` is ours."""


class PerRankWrapper(PerRankStateful):
    """A per-rank Stateful whose load takes the states of all saved ranks merged by `merge`
    (for the data loader: `titan_lrt.data.loader.merge_loader_states`)."""

    def __init__(self, stateful: Stateful, merge: Callable[[list[Any]], Any]):
        self.stateful = stateful
        self.merge = merge

    def state_dict(self) -> Any:
        return self.stateful.state_dict()

    def load_rank_states(self, states: list[Any], rank: int) -> None:
        self.stateful.load_state_dict(self.merge(states))


@dataclass
class TrainState(PerRankStateful):
    """Where training stands; saved per rank because each rank has its own RNG streams."""

    step: int = 0
    tokens_seen: int = 0
    """Tokens trained on by all ranks together."""
    flops_seen: dict[str, float] = field(default_factory=dict)
    """Training FLOPs run so far by all ranks together, per pass name (pass0, subset0, ...)."""

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "flops_seen": self.flops_seen, "rng": rng_state()}

    def load_rank_states(self, states: list[dict[str, Any]], rank: int) -> None:
        first = states[0]
        for r, state in enumerate(states):
            if (state["step"], state["tokens_seen"]) != (first["step"], first["tokens_seen"]):
                raise ValueError(
                    f"inconsistent checkpoint: rank {r} saved step {state['step']} ({state['tokens_seen']} tokens), "
                    f"rank 0 step {first['step']} ({first['tokens_seen']} tokens)"
                )
        self.step, self.tokens_seen = first["step"], first["tokens_seen"]
        self.flops_seen = dict(first.get("flops_seen", {}))  # empty from checkpoints of before the count
        if rank < len(states):
            set_rng_state(states[rank]["rng"])
        else:
            logger.warning(
                "checkpoint was saved by %d ranks: rank %d has no saved RNG state and keeps its current one",
                len(states),
                rank,
            )


def rng_state() -> dict[str, Any]:
    """This process's RNG streams: torch CPU, CUDA (current device, when available), Python."""
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- per-rank states as JSON -------------------------------------------------------------
# Saved as a uint8 tensor of JSON text: no pickle, so a crafted checkpoint cannot run code
# through them. Tensors inside (the RNG states) travel as base64 of their bytes.

_TENSOR = "__tensor__"


def encode_rank_state(state: Any) -> torch.Tensor:
    """A per-rank state (JSON types and CPU tensors) as a uint8 tensor of JSON text."""
    text = json.dumps(state, default=_encode_tensor, allow_nan=False)
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def decode_rank_state(data: torch.Tensor) -> Any:
    return json.loads(bytes(data.numpy()).decode(), object_hook=_decode_tensor)


def _encode_tensor(value: Any) -> dict[str, Any]:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"per-rank checkpoint states hold JSON types and tensors, not {type(value).__name__}")
    value = value.detach().cpu().contiguous()
    raw = value.view(torch.uint8).numpy().tobytes() if value.numel() else b""
    return {
        _TENSOR: str(value.dtype).removeprefix("torch."),
        "shape": list(value.shape),
        "data": base64.b64encode(raw).decode(),
    }


def _decode_tensor(obj: dict[str, Any]) -> Any:
    if _TENSOR not in obj:
        return obj
    dtype = getattr(torch, obj[_TENSOR])
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"per-rank state: {obj[_TENSOR]!r} is not a torch dtype")
    raw = bytearray(base64.b64decode(obj["data"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(obj["shape"])


# ---- folders ------------------------------------------------------------------------------


def step_folders(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N*` entry in `folder` (complete or not), highest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FOLDER.fullmatch(p.name))]
    return sorted(found, key=lambda item: (item[0], item[1].name), reverse=True)


def checkpoint_problem(path: str | os.PathLike, *, verify: bool = False) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is one.

    Complete: the step folder's final name, a well-formed marker, every listed file present
    with its recorded size. `verify` also reads every file against its recorded checksum and
    reads the DCP metadata (through `_MetadataUnpickler`): what loading it takes.
    """
    path = Path(path)
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is not a folder"
    match = _STEP_FOLDER.fullmatch(path.name)
    if match and match.group(2):
        return f"its name ends in {match.group(2)!r}: a save that has not finished (or was interrupted)"
    try:
        files = _marker_files(read_marker(path))
    except FileNotFoundError:
        return f"it has no {MARKER} marker: a save that was interrupted, or not a titan_lrt checkpoint"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"its {MARKER} is unreadable ({err})"
    for name, (size, _) in files.items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return f"file {name}, listed in {MARKER}, is missing"
        if actual != size:
            return f"file {name} has {actual} bytes, {MARKER} records {size}"
    if not verify:
        return None
    recorded = {name: checksum for name, (_, checksum) in files.items() if checksum is not None}
    for name, actual in checksums(path, list(recorded)).items():
        if actual != recorded[name]:
            return f"file {name} is damaged: its {CHECKSUM} is {actual}, {MARKER} records {recorded[name]}"
    try:
        read_metadata(path)
    except Exception as err:  # noqa: BLE001 - any failure to read means "not loadable"
        return f"its DCP metadata is unreadable ({type(err).__name__}: {err})"
    return None


def read_marker(path: Path) -> dict[str, Any]:
    marker = json.loads((path / MARKER).read_text())
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise TypeError("expected a JSON object with an integer 'step'")
    return marker


def _marker_files(marker: dict[str, Any]) -> dict[str, tuple[int, str | None]]:
    """name -> (size, checksum) of the files a marker lists; markers of older versions record
    sizes only (checksum None)."""
    files = marker["files"]
    if not isinstance(files, dict) or METADATA not in files:
        raise ValueError(f"'files' must be an object listing {METADATA} and the data files")
    out = {}
    for name, entry in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"file name {name!r} is not a plain name")
        size, checksum = (entry, None) if isinstance(entry, int) else (entry["size"], entry[CHECKSUM])
        if not isinstance(size, int) or not (checksum is None or isinstance(checksum, str)):
            raise ValueError(f"entry of {name!r} is malformed: {entry!r}")
        out[name] = (size, checksum)
    return out


def file_checksum(path: str | os.PathLike) -> str:
    """CRC-32 of a file, read in big chunks (zlib releases the GIL, so threads run in parallel)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksums(folder: Path, names: Sequence[str]) -> dict[str, str]:
    """name -> checksum of files in `folder`, several files at once."""
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return dict(zip(names, pool.map(lambda name: file_checksum(folder / name), names)))


def write_marker(folder: Path, step: int, world_size: int) -> dict[str, Any]:
    """Write `complete.json` into a finished folder: step, world size, size and checksum of every file.
    The one writer of the marker (the trainer's saves and `export.write_checkpoint`)."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    sums = checksums(folder, names)
    files = {name: {"size": (folder / name).stat().st_size, CHECKSUM: sums[name]} for name in names}
    marker = {"step": step, "world_size": world_size, "files": files, "saved_at": time.time()}
    with open(folder / MARKER, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return marker


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The DCP metadata of a step folder, unpickled with `_MetadataUnpickler` (no code runs)."""
    return _SafeReader(str(path)).read_metadata()


def load_dcp(state_dict: dict[str, Any], path: str | os.PathLike, **kwargs: Any) -> None:
    """`dcp.load` with the restricted readers: metadata by `_MetadataUnpickler`, non-tensor values
    by `torch.load(weights_only=True)`."""
    try:
        dcp.load(state_dict, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner(), **kwargs)
    except CheckpointException as err:  # a BaseException listing each rank's traceback: say the first cause
        raise ValueError(f"checkpoint {path} could not be read: {_first_cause(err)}") from None


def _first_cause(err: CheckpointException) -> str:
    cause = _unwrap(next(iter(err.failures.values()), err))
    lines = str(cause).splitlines() or [""]
    detail = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
    return f"{type(cause).__name__}: {detail}"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global but the metadata classes and torch types it
    uses: a crafted `.metadata` cannot name a function to call."""

    ALLOWED: ClassVar[dict[str, set[str]]] = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a DCP metadata type")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"{METADATA} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)  # DCP's own uses weights_only=False
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _contents(path: Path, limit: int = 12) -> str:
    if not path.is_dir():
        return ""
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return f"; it contains: {shown or 'nothing'}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _PendingSave:
    step: int
    partial: Path
    started: float
    future: Future
    needed: int
    """Bytes of this rank's states (for the message of a full disk)."""


# ---- the manager --------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores the training states (`name -> Stateful or PerRankStateful`) with DCP.

    `states` must hold "model" (a `ModelWrapper`); the trainer typically also passes
    "optimizer", "lr_scheduler", "dataloader" (a `PerRankWrapper`) and "train_state"
    (a `TrainState`). All ranks construct the manager and call `save`, `load`,
    `maybe_wait` and `close` together.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        states: Mapping[str, Any],
        *,
        interval: int,
        keep_latest_k: int,
        async_mode: str,
        load: str,
        initial_load_path: str | os.PathLike | None,
        initial_load_model_only: bool = True,
        run_config: str | None = None,
    ):
        """
        folder: the run's checkpoint folder, e.g. `<dump_folder>/checkpoints`.
        interval: `save` saves every `interval` steps.
        keep_latest_k: keep this many newest checkpoints (0: keep all).
        async_mode: "disabled", "async" (a writer thread) or "async_process" (a writer process per
            rank; needs torch.distributed initialized and a `__main__` guard in the launched script).
        load: "latest" (resume from the newest loadable checkpoint, falling back past damaged ones;
            an error when step folders exist and none loads), "none" (start fresh) or the path of a
            step folder.
        initial_load_path: a checkpoint to start from when nothing is resumed (`load` is "none",
            or "latest" with no checkpoint in `folder`).
        initial_load_model_only: from `initial_load_path` take the model weights only (the run
            starts at step 0); False restores every state, as a resume would.
        run_config: the resolved run config, written by rank 0 into every checkpoint as `RUN_CONFIG`.
        """
        # interval, keep_latest_k and async_mode are checked where the config is loaded.
        if async_mode == "async_process" and not dist.is_initialized():
            raise ValueError(
                "checkpoint.async_mode='async_process' needs torch.distributed to be initialized "
                "(launch with torchrun); use 'async' in a single process"
            )
        if MODEL not in states:
            raise ValueError(f"states must include {MODEL!r} (a ModelWrapper); got {sorted(states)}")
        for name, state in states.items():
            if not isinstance(state, (Stateful, PerRankStateful)) or "." in name:
                raise ValueError(
                    f"state {name!r}: expected a name without dots and an object with state_dict() and "
                    f"load_state_dict() (or a PerRankStateful), got {type(state).__name__}"
                )
        self.folder = Path(folder)
        self.states = dict(states)
        self.interval = interval
        self.keep_latest_k = keep_latest_k
        self.async_mode = async_mode
        self._async_writer = _ASYNC_WRITERS[async_mode]
        self.load_setting = load
        self.initial_load_path = Path(initial_load_path) if initial_load_path else None
        self.initial_load_model_only = initial_load_model_only
        self.run_config = run_config
        if load not in ("latest", "none"):
            self._check_complete(Path(load), "checkpoint.load")
        if self.initial_load_path is not None:
            self._check_complete(self.initial_load_path, "checkpoint.initial_load_path")

        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # DCP's collectives run on their own gloo group: an async save runs them in a
        # background thread, which must not interleave with the trainer's collectives.
        self._pg = dist.new_group(backend="gloo") if self.distributed else None
        self._pending: _PendingSave | None = None
        self._last_saved: int | None = None
        self.refused: str | None = None
        """Why the last save that was due was refused (non-finite states), None when it was written."""

    # ---- saving ---------------------------------------------------------------------------

    def save(self, step: int, *, force: bool = False) -> bool:
        """Save at every `interval`-th step, or now when `force` (the last step); returns whether it did.

        Refuses (returns False, logging one line) when any parameter or optimizer value is not
        finite: such a checkpoint would make every later resume fail the same way. Raises OSError
        (ENOSPC) with the path and sizes when the disk is full; the unfinished folder is removed.
        """
        if self._pending is not None and self._pending.future.done():
            self.maybe_wait()
        if (step % self.interval and not force) or step == self._last_saved:
            return False
        self.maybe_wait()
        started = time.perf_counter()
        state_dict = self._state_dict_to_save()
        if self._refuse_non_finite(step, state_dict):
            return False
        partial = self.folder / (step_folder_name(step) + _PARTIAL)
        needed = _nbytes(state_dict)
        try:
            if self.rank == 0:
                if partial.exists():
                    logger.warning("removing %s, left behind by an interrupted save", partial)
                    shutil.rmtree(partial)
                partial.mkdir(parents=True)
                if self.run_config is not None:
                    (partial / RUN_CONFIG).write_text(self.run_config)
            if self.distributed:
                dist.barrier(group=self._pg)  # nobody writes into the folder before rank 0 has (re)made it
            kwargs = dict(checkpoint_id=str(partial), process_group=self._pg, no_dist=not self.distributed)
            if self.async_mode == "disabled":
                dcp.save(state_dict, **kwargs)
                if self.rank == 0:
                    self._commit(step, partial, started)
            else:
                future = dcp.async_save(state_dict, async_checkpointer_type=self._async_writer, **kwargs)
                self._pending = _PendingSave(step, partial, started, future, needed)
                logger.info(
                    "checkpoint step %d: staged in %.2f s, writing in the background",
                    step,
                    time.perf_counter() - started,
                )
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised by _save_failed
            self._save_failed(err, step, partial, needed)
        self._last_saved = step
        return True

    def maybe_wait(self) -> None:
        """Wait for the save in flight, if any, and make it the newest complete checkpoint."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        # On rank 0 the future completes after DCP's coordinator wrote the metadata, which it
        # does only once every rank reported its writes done: the whole folder is written.
        try:
            pending.future.result()
            if self.rank == 0:
                self._commit(pending.step, pending.partial, pending.started)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - re-raised by _save_failed
            self._save_failed(err, pending.step, pending.partial, pending.needed)

    def close(self) -> None:
        """Finish the save in flight and release the checkpoint process group."""
        self.maybe_wait()
        if self._pg is not None:
            dist.destroy_process_group(self._pg)
            self._pg = None

    def _state_dict_to_save(self) -> dict[str, Any]:
        state_dict: dict[str, Any] = {}
        for name, state in self.states.items():
            if isinstance(state, PerRankStateful):
                state_dict[f"{name}.rank{self.rank}"] = encode_rank_state(state.state_dict())
            else:
                state_dict[name] = state.state_dict()
        return state_dict

    def _refuse_non_finite(self, step: int, state_dict: dict[str, Any]) -> bool:
        """Whether any rank holds a non-finite value (all ranks agree); logs the first one found."""
        bad = [key for key, value in _flat_tensors(state_dict) if not _all_finite(value)]
        counts = torch.zeros(self.world_size, dtype=torch.long)
        counts[self.rank] = len(bad)
        if self.distributed:
            dist.all_reduce(counts, group=self._pg)
        if not counts.any():
            self.refused = None
            return False
        where = (
            (f"{bad[0]!r}" + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""))
            if bad
            else (f"tensors of rank(s) {counts.nonzero().flatten().tolist()}")
        )
        self.refused = (
            f"checkpoint step {step} NOT saved: non-finite values (nan/inf) in {where}; "
            f"the newest checkpoint in {self.folder} is left as it was"
        )
        if bad or self.rank == 0:
            logger.error("%s", self.refused)
        return True

    def _save_failed(self, err: BaseException, step: int, partial: Path, needed: int) -> None:
        """Remove the unfinished folder and re-raise; a full disk as one line saying so."""
        free = _free_bytes(self.folder)
        full = _out_of_space(err) or (free is not None and free < needed)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if not full:
            raise err
        raise OSError(
            errno.ENOSPC,
            f"no space left on device: checkpoint step {step} could not be written to {partial} (this rank's "
            f"states take {_mb(needed)}, {_mb(free)} was free on that file system; the unfinished folder is "
            f"removed and older checkpoints are intact). Free space, or move job.dump_folder, then resume",
        ) from err

    def _commit(self, step: int, partial: Path, started: float) -> None:
        """Rank 0: mark the written folder complete, move it into place, drop the oldest."""
        marker = write_marker(partial, step, self.world_size)
        final = self.folder / step_folder_name(step)
        if final.exists():
            logger.warning("replacing %s, an earlier checkpoint of the same step", final)
            replaced = final.with_name(final.name + _REPLACED)
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
            os.rename(partial, final)
            shutil.rmtree(replaced)
        else:
            os.rename(partial, final)
        _fsync_dir(self.folder)
        logger.info(
            "checkpoint step %d saved to %s (%.1f MB) in %.2f s",
            step,
            final,
            sum(f["size"] for f in marker["files"].values()) / 2**20,
            time.perf_counter() - started,
        )
        complete = self._complete_steps()
        newer = [s for s in complete if s > step]
        if newer:
            logger.warning(
                "%s holds newer checkpoints than step %d (%s): load='latest' would resume from those",
                self.folder,
                step,
                ", ".join(step_folder_name(s) for s in newer),
            )
        if self.keep_latest_k:
            for old in complete[: -self.keep_latest_k]:
                if old != step:
                    logger.info("removing %s (keep_latest_k=%d)", step_folder_name(old), self.keep_latest_k)
                    _remove_folder(self.folder / step_folder_name(old))

    # ---- finding checkpoints ------------------------------------------------------------

    def _step_folders(self) -> list[tuple[int, Path]]:
        return step_folders(self.folder)

    def _complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(step for step, path in self._step_folders() if checkpoint_problem(path) is None)

    def latest_step(self) -> int | None:
        """The highest complete step in the folder; incomplete folders above it are skipped with a warning."""
        in_flight = self._pending.partial if self._pending is not None else None
        for step, path in self._step_folders():
            problem = checkpoint_problem(path)
            if problem is None:
                return step
            if path != in_flight:
                logger.warning("skipping %s: %s", path, problem)
        return None

    def remove_leftovers(self) -> None:
        """Remove what interrupted saves and deletions left: `step-N.partial` (`.deleting`, `.replaced`)
        folders, and step folders holding nothing but the marker. Never a folder with data."""
        in_flight = self._pending.partial if self._pending is not None else None
        for _, path in self._step_folders():
            suffix = _STEP_FOLDER.fullmatch(path.name).group(2)
            if path == in_flight or not path.is_dir():
                continue
            if suffix in _LEFTOVER_SUFFIXES:
                logger.warning("skipping and removing %s: a save or deletion that was interrupted", path)
                shutil.rmtree(path)
            elif not suffix and {p.name for p in path.iterdir()} <= {MARKER}:
                logger.warning("removing %s: it holds only %s, left by a deletion that was interrupted", path, MARKER)
                shutil.rmtree(path)

    def _newest_loadable(self, *, required: bool) -> Path | None:
        """The newest step folder that loads (checksums and metadata verified); damaged ones are skipped
        with a warning naming the folder and the reason. Raises when step folders exist and none loads
        (or, if `required`, when there is none at all)."""
        failed = []
        for _, path in self._step_folders():
            if _STEP_FOLDER.fullmatch(path.name).group(2):
                continue  # not a step folder's final name: not ours to judge
            problem = checkpoint_problem(path, verify=True)
            if problem is None:
                if failed:
                    logger.warning("falling back to %s", path)
                return path
            logger.warning("skipping %s: %s", path, problem)
            failed.append(f"{path.name}: {problem}")
        if failed or required:
            raise ValueError(
                f"no checkpoint in {self.folder} can be loaded"
                + (f" ({'; '.join(failed)})" if failed else "")
                + ". Repair or remove the step folders, or start fresh with checkpoint.load='none'"
            )
        return None

    def _check_complete(self, path: Path, setting: str, *, verify: bool = False) -> None:
        problem = checkpoint_problem(path, verify=verify)
        if problem is None:
            return
        complete = [step_folder_name(s) for s in self._complete_steps()]
        raise (FileNotFoundError if not path.exists() else ValueError)(
            f"{setting}={str(path)!r} is not a complete checkpoint: {problem}{_contents(path)}. "
            f"Allowed: a complete step folder written by CheckpointManager"
            + (f" (in {self.folder}: {', '.join(complete)})" if complete else "")
            + ("; or 'latest' / 'none'" if setting == "checkpoint.load" else "")
        )

    # ---- loading ------------------------------------------------------------------------

    def load(self, step: int | None = None) -> int | None:
        """Restore the states per the `load` setting, or from this folder's `step` when given.

        First removes the leftovers of interrupted saves (`remove_leftovers`). Returns the step
        training resumes from: the checkpoint's step, 0 after a model-only initial load, None when
        nothing was loaded (a fresh start).
        """
        return self._load(lambda: self._choose(step))

    def load_latest_good(self) -> int:
        """Restore every state from the newest checkpoint of this folder that loads, whatever the
        `load` setting (a rollback); damaged newer ones are skipped with a warning. Returns its step;
        raises ValueError when there is none."""
        return self._load(lambda: (self._newest_loadable(required=True), False))

    def _load(self, choose: Callable[[], tuple[Path, bool] | None]) -> int | None:
        self.maybe_wait()
        choice: Any = None
        if self.rank == 0:
            try:
                self.remove_leftovers()
                choice = choose()
            except Exception as err:  # noqa: BLE001 - raised below on every rank, not only here
                choice = err
        if self.distributed:  # every rank loads what rank 0 found
            box = [choice]
            dist.broadcast_object_list(box, src=0, group=self._pg)
            choice = box[0]
        if isinstance(choice, Exception):
            raise choice
        if choice is None:
            logger.info("checkpoint: nothing to load, starting fresh (load=%r)", self.load_setting)
            return None
        path, model_only = choice
        started = time.perf_counter()
        metadata = read_metadata(path)
        model_state = self.states[MODEL].state_dict()
        _check_model(path, model_state, metadata)
        state_dict: dict[str, Any] = {MODEL: model_state}
        ranks: dict[str, list[int]] = {}
        if not model_only:
            for name, state in self.states.items():
                if name == MODEL:
                    continue
                if isinstance(state, PerRankStateful):
                    ranks[name] = _saved_ranks(path, metadata, name)
                    for r in ranks[name]:
                        state_dict[f"{name}.rank{r}"] = _rank_state_buffer(path, metadata, f"{name}.rank{r}")
                else:
                    _check_present(path, metadata, name)
                    state_dict[name] = state.state_dict()
        load_dcp(state_dict, path, process_group=self._pg, no_dist=not self.distributed)
        for name, state in self.states.items():
            if name in ranks:
                states = [decode_rank_state(state_dict[f"{name}.rank{r}"]) for r in ranks[name]]
                state.load_rank_states(states, self.rank)
            elif name in state_dict:
                state.load_state_dict(state_dict[name])
        resumed = 0 if model_only else read_marker(path)["step"]
        if not model_only:
            self._last_saved = resumed  # a forced save of the same step would rewrite what was just loaded
        logger.info(
            "checkpoint: loaded %s from %s in %.2f s",
            "model weights" if model_only else f"step {resumed}",
            path,
            time.perf_counter() - started,
        )
        return resumed

    def _choose(self, step: int | None) -> tuple[Path, bool] | None:
        """(path, model_only) of what to load, or None for a fresh start; raises on a bad setting."""
        if step is not None:
            path = self.folder / step_folder_name(step)
            self._check_complete(path, "load(step)", verify=True)
            return path, False
        if self.load_setting == "latest":
            latest = self._newest_loadable(required=False)
            if latest is not None:
                return latest, False
        elif self.load_setting != "none":
            path = Path(self.load_setting)
            self._check_complete(path, "checkpoint.load", verify=True)
            return path, False
        if self.initial_load_path is not None:
            self._check_complete(self.initial_load_path, "checkpoint.initial_load_path", verify=True)
            return self.initial_load_path, self.initial_load_model_only
        return None


def _check_model(path: Path, model_state: dict[str, Any], metadata: Metadata) -> None:
    """Fail before reading any data when the checkpoint's model keys or shapes differ from the model's."""
    check_model_keys(f"checkpoint {path}", {k: _shape(v) for k, v in model_state.items()}, saved_model_shapes(metadata))


def saved_model_shapes(metadata: Metadata) -> dict[str, tuple[int, ...] | None]:
    """fqn -> shape (None for a non-tensor value) of the `model.*` entries of DCP metadata."""
    prefix = MODEL + "."
    return {
        key[len(prefix) :]: tuple(md.size) if isinstance(md, TensorStorageMetadata) else None
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }


def check_model_keys(
    source: str, model: Mapping[str, tuple[int, ...] | None], saved: Mapping[str, tuple[int, ...] | None]
) -> None:
    """Fail with the first key or shape of saved weights (a checkpoint's, an export's) that does not fit
    the model: every model key saved, with the model's shape, and nothing else."""
    for key, shape in model.items():
        if key not in saved:
            raise ValueError(
                f"{source} does not match the model: model key {key!r} (shape {shape}) is not in the checkpoint"
            )
        if saved[key] != shape:
            raise ValueError(
                f"{source} does not match the model: key {key!r} has shape {saved[key]} "
                f"in the checkpoint and {shape} in the model"
            )
    extra = sorted(set(saved) - set(model))
    if extra:
        raise ValueError(
            f"{source} does not match the model: checkpoint key {extra[0]!r} "
            f"({len(extra)} such keys in all) is not in the model"
        )


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _saved_names(metadata: Metadata) -> list[str]:
    return sorted({key.split(".")[0] for key in metadata.state_dict_metadata})


def _check_present(path: Path, metadata: Metadata, name: str) -> None:
    if not any(key == name or key.startswith(name + ".") for key in metadata.state_dict_metadata):
        raise ValueError(
            f"checkpoint {path} has no {name!r} state (it holds: {', '.join(_saved_names(metadata))}); "
            "to take only the model from it use initial_load_path with initial_load_model_only=True"
        )


def _saved_ranks(path: Path, metadata: Metadata, name: str) -> list[int]:
    """The ranks that saved per-rank state `name`: 0..W-1 for the saved world size W."""
    pattern = re.compile(re.escape(name) + r"\.rank(\d+)")
    ranks = sorted(int(m.group(1)) for key in metadata.state_dict_metadata if (m := pattern.fullmatch(key)))
    if not ranks:
        _check_present(path, metadata, name)
        raise ValueError(f"checkpoint {path} holds {name!r} as one state, not per rank ({name}.rank<r>)")
    if ranks != list(range(len(ranks))):
        raise ValueError(f"checkpoint {path} has {name!r} entries of ranks {ranks}, expected 0..{len(ranks) - 1}")
    return ranks


def _rank_state_buffer(path: Path, metadata: Metadata, key: str) -> torch.Tensor:
    """Room for a saved per-rank state (JSON text as uint8); older versions pickled these."""
    md = metadata.state_dict_metadata[key]
    if not isinstance(md, TensorStorageMetadata) or md.properties.dtype != torch.uint8:
        raise ValueError(
            f"checkpoint {path} holds {key!r} as a pickle (written by an older titan_lrt), which is never "
            "unpickled; take its model only with checkpoint.initial_load_path, or start fresh"
        )
    return torch.empty(tuple(md.size), dtype=torch.uint8)


def _flat_tensors(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) of every floating-point tensor in a nested state dict."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)] if value.is_floating_point() else []
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items for found in _flat_tensors(item, f"{prefix}.{key}" if prefix else str(key))]


def _all_finite(value: torch.Tensor) -> bool:
    local = value.to_local() if isinstance(value, DTensor) else value
    return bool(torch.isfinite(local).all())


def _nbytes(state_dict: dict[str, Any]) -> int:
    tensors = [t.to_local() if isinstance(t, DTensor) else t for _, t in _flat_tensors(state_dict)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _out_of_space(err: BaseException) -> bool:
    """Whether ENOSPC is anywhere in the error's chain (DCP wraps errors per rank)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        e = _unwrap(e)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
            return True
        failures = getattr(e, "failures", None)
        todo += [e.__cause__, e.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    return False


def _unwrap(failure: Any) -> Any:
    """The exception of one of DCP's per-rank failures, an (exception, traceback) tuple."""
    return failure[0] if isinstance(failure, tuple) and failure else failure


def _free_bytes(folder: Path) -> int | None:
    for path in (folder, *folder.parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return None


def _mb(nbytes: int | None) -> str:
    return "an unknown amount" if nbytes is None else f"{nbytes / 2**20:.1f} MB"


def _remove_folder(path: Path) -> None:
    """Delete a step folder so that an interruption leaves a `.deleting` leftover, never a
    `step-N` folder with part of its files."""
    doomed = path.with_name(path.name + _DELETING)
    os.rename(path, doomed)
    shutil.rmtree(doomed)
