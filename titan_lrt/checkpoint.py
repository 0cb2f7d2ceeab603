"""Distributed checkpointing with DCP: save, resume (also on another world size), keep the last k.

Layout of the checkpoint folder:

    step-00000100/            a complete checkpoint
        .metadata             DCP metadata (written by DCP's coordinator once every rank wrote)
        __0_0.distcp ...      DCP data, one file per rank
        config.toml           the resolved run config (rank 0)
        complete.json         the marker: step, world size, size of every file above
    step-00000200.partial/    a save in flight, or one that a crash interrupted

Atomicity: all ranks write into `step-N.partial`; only when DCP has finished on
every rank (for an async save: when its future has completed) does rank 0
write the marker and rename the folder to `step-N` (one atomic rename). A
folder is complete when it has that exact name, the marker, files of the
recorded sizes and readable metadata; "latest" is the highest complete step and
anything above it is skipped with a warning. `keep_latest_k` only ever deletes
older complete checkpoints, after the new one is complete.

Keys: the state dict of each state is saved under its name (`model.<fqn>`,
`optimizer.state.<fqn>.exp_avg`, ...; DCP flattens nested dicts). A state that
differs per rank (`PerRankStateful`: the data loader, the RNG streams) is saved
as `<name>.rank<r>`, rank r's state pickled to bytes: DCP lets every rank write
its own non-tensor keys and read those of every other rank, so on load each rank
gets the states of all saved ranks, in rank order, and merges them. This is what
makes a resume on a different world size possible.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)
# DCP warns on every single-process save and load (also from the async writer thread), even
# when asked for exactly that with no_dist=True.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)", category=UserWarning)

_ASYNC_WRITERS = {"disabled": None, "async": AsyncCheckpointerType.THREAD, "async_process": AsyncCheckpointerType.PROCESS}
ASYNC_MODES = tuple(_ASYNC_WRITERS)
"""checkpoint.async_mode: see `CheckpointManager`."""
MARKER = "complete.json"
RUN_TOKENIZER = "tokenizer.json"
"""The trainer copies the run's tokenizer to <job.dump_folder>/tokenizer.json, so that a
checkpoint carries everything needed to use the model."""
MODEL = "model"
_STEP_FOLDER = re.compile(r"step-(\d{8})(.*)")
_PARTIAL = ".partial"


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
        """This rank's state (picklable)."""

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

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rng": rng_state()}

    def load_rank_states(self, states: list[dict[str, Any]], rank: int) -> None:
        first = states[0]
        for r, state in enumerate(states):
            if (state["step"], state["tokens_seen"]) != (first["step"], first["tokens_seen"]):
                raise ValueError(
                    f"inconsistent checkpoint: rank {r} saved step {state['step']} ({state['tokens_seen']} tokens), "
                    f"rank 0 step {first['step']} ({first['tokens_seen']} tokens)"
                )
        self.step, self.tokens_seen = first["step"], first["tokens_seen"]
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
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- folders ------------------------------------------------------------------------------


def step_folders(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N*` entry in `folder` (complete or not), highest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FOLDER.fullmatch(p.name))]
    return sorted(found, key=lambda item: (item[0], item[1].name), reverse=True)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is one."""
    path = Path(path)
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is not a folder"
    match = _STEP_FOLDER.fullmatch(path.name)
    if match and match.group(2):
        return f"its name ends in {match.group(2)!r}: a save that has not finished (or was interrupted)"
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"it has no {MARKER} marker: a save that was interrupted, or not a titan_lrt checkpoint"
    except (ValueError, KeyError, TypeError) as err:
        return f"its {MARKER} is unreadable ({err!r})"
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return f"file {name}, listed in {MARKER}, is missing"
        if actual != size:
            return f"file {name} has {actual} bytes, {MARKER} records {size}"
    try:
        _read_metadata(path)
    except Exception as err:  # noqa: BLE001 - any failure to read means "not loadable"
        return f"its DCP metadata is unreadable ({type(err).__name__}: {err})"
    return None


def _read_metadata(path: Path) -> Metadata:
    return dcp.FileSystemReader(str(path)).read_metadata()


def _marker_step(path: Path) -> int:
    return json.loads((path / MARKER).read_text())["step"]


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
        run_config_name: str = "config.toml",
    ):
        """
        folder: the run's checkpoint folder, e.g. `<dump_folder>/checkpoints`.
        interval: `save` saves every `interval` steps.
        keep_latest_k: keep this many newest checkpoints (0: keep all).
        async_mode: "disabled", "async" (a writer thread) or "async_process" (a writer process per
            rank; needs torch.distributed initialized and a `__main__` guard in the launched script).
        load: "latest" (resume from the newest complete checkpoint, if any), "none" (start fresh)
            or the path of a step folder.
        initial_load_path: a checkpoint to start from when nothing is resumed (`load` is "none",
            or "latest" with no checkpoint in `folder`).
        initial_load_model_only: from `initial_load_path` take the model weights only (the run
            starts at step 0); False restores every state, as a resume would.
        run_config: the resolved run config, written by rank 0 into every checkpoint as `run_config_name`.
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
        self.run_config_name = run_config_name
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

    # ---- saving ---------------------------------------------------------------------------

    def save(self, step: int, *, force: bool = False) -> bool:
        """Save at every `interval`-th step, or now when `force` (the last step); returns whether it did."""
        if self._pending is not None and self._pending.future.done():
            self.maybe_wait()
        if (step % self.interval and not force) or step == self._last_saved:
            return False
        self.maybe_wait()
        started = time.perf_counter()
        partial = self.folder / (step_folder_name(step) + _PARTIAL)
        if self.rank == 0:
            if partial.exists():
                logger.warning("removing %s, left behind by an interrupted save", partial)
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            if self.run_config is not None:
                (partial / self.run_config_name).write_text(self.run_config)
        if self.distributed:
            dist.barrier(group=self._pg)  # nobody writes into the folder before rank 0 has (re)made it
        state_dict = self._state_dict_to_save()
        kwargs = dict(checkpoint_id=str(partial), process_group=self._pg, no_dist=not self.distributed)
        if self.async_mode == "disabled":
            dcp.save(state_dict, **kwargs)
            if self.rank == 0:
                self._commit(step, partial, started)
        else:
            future = dcp.async_save(state_dict, async_checkpointer_type=self._async_writer, **kwargs)
            self._pending = _PendingSave(step, partial, started, future)
            logger.info("checkpoint step %d: staged in %.2f s, writing in the background", step, time.perf_counter() - started)
        self._last_saved = step
        return True

    def maybe_wait(self) -> None:
        """Wait for the save in flight, if any, and make it the newest complete checkpoint."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        # On rank 0 the future completes after DCP's coordinator wrote the metadata, which it
        # does only once every rank reported its writes done: the whole folder is written.
        pending.future.result()
        if self.rank == 0:
            self._commit(pending.step, pending.partial, pending.started)

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
                state_dict[f"{name}.rank{self.rank}"] = pickle.dumps(state.state_dict())
            else:
                state_dict[name] = state.state_dict()
        return state_dict

    def _commit(self, step: int, partial: Path, started: float) -> None:
        """Rank 0: mark the written folder complete, move it into place, drop the oldest."""
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
        marker = {"step": step, "world_size": self.world_size, "files": files, "saved_at": time.time()}
        with open(partial / MARKER, "w") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = self.folder / step_folder_name(step)
        if final.exists():
            logger.warning("replacing %s, an earlier checkpoint of the same step", final)
            replaced = final.with_name(final.name + ".replaced")
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
            sum(files.values()) / 2**20,
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
                    shutil.rmtree(self.folder / step_folder_name(old))

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

    def _check_complete(self, path: Path, setting: str) -> None:
        problem = checkpoint_problem(path)
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

        Returns the step training resumes from: the checkpoint's step, 0 after a model-only
        initial load, None when nothing was loaded (a fresh start).
        """
        self.maybe_wait()
        choice: Any = None
        if self.rank == 0:
            try:
                choice = self._choose(step)
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
        metadata = _read_metadata(path)
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
                    state_dict.update({f"{name}.rank{r}": b"" for r in ranks[name]})
                else:
                    _check_present(path, metadata, name)
                    state_dict[name] = state.state_dict()
        dcp.load(state_dict, checkpoint_id=str(path), process_group=self._pg, no_dist=not self.distributed)
        for name, state in self.states.items():
            if name in ranks:
                state.load_rank_states([pickle.loads(state_dict[f"{name}.rank{r}"]) for r in ranks[name]], self.rank)
            elif name in state_dict:
                state.load_state_dict(state_dict[name])
        resumed = 0 if model_only else _marker_step(path)
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
            self._check_complete(path, "load(step)")
            return path, False
        if self.load_setting == "latest":
            latest = self.latest_step()
            if latest is not None:
                return self.folder / step_folder_name(latest), False
        elif self.load_setting != "none":
            path = Path(self.load_setting)
            self._check_complete(path, "checkpoint.load")
            return path, False
        if self.initial_load_path is not None:
            self._check_complete(self.initial_load_path, "checkpoint.initial_load_path")
            return self.initial_load_path, self.initial_load_model_only
        return None


def _check_model(path: Path, model_state: dict[str, Any], metadata: Metadata) -> None:
    """Fail before reading any data when the checkpoint's model keys or shapes differ from the model's."""
    saved = {
        key[len(MODEL) + 1 :]: md for key, md in metadata.state_dict_metadata.items() if key.startswith(MODEL + ".")
    }
    for key, value in model_state.items():
        if key not in saved:
            raise ValueError(
                f"checkpoint {path} does not match the model: model key {key!r} "
                f"(shape {_shape(value)}) is not in the checkpoint"
            )
        saved_shape = tuple(saved[key].size) if isinstance(saved[key], TensorStorageMetadata) else None
        if saved_shape != _shape(value):
            raise ValueError(
                f"checkpoint {path} does not match the model: key {key!r} has shape {saved_shape} "
                f"in the checkpoint and {_shape(value)} in the model"
            )
    extra = sorted(set(saved) - set(model_state))
    if extra:
        raise ValueError(
            f"checkpoint {path} does not match the model: checkpoint key {extra[0]!r} "
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

