"""Tests of titan_lrt.checkpoint: round trip, keep_latest_k, async, atomic latest, load settings,
clear errors, model-only initial load, and per-rank states across world sizes (2 gloo processes)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from titan_lrt.checkpoint import (
    MARKER,
    CheckpointManager,
    ModelWrapper,
    PerRankWrapper,
    TrainState,
    decode_rank_state,
    write_marker,
)
from titan_lrt.config import ConfigError, load_config
from titan_lrt.data.loader import merge_loader_states
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.transformer import Transformer
from titan_lrt.optim import OptimizersContainer

ARGS = ModelArgs()  # the debug shape: 2 layers, dim 64
NUM_STREAMS = 4
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is:UserWarning"),  # see checkpoint.py
    pytest.mark.usefixtures("one_thread"),
]

LOADER_SETTINGS = {"num_streams": NUM_STREAMS, "seq_len": 16, "packing": "bos_aligned", "seed": 0}


class StreamCounter:
    """Test double of the data loader: owns streams r, r+W, ... and keeps their state in the
    real loader's format, so that `merge_loader_states` applies."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rows = {s: 0 for s in range(rank, NUM_STREAMS, world_size)}
        self.loaded: dict | None = None

    def advance(self) -> None:
        self.rows = {s: n + 1 for s, n in self.rows.items()}

    def state_dict(self) -> dict:
        return {**LOADER_SETTINGS, "streams": {str(s): {"rows": n} for s, n in self.rows.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state
        self.rows = {s: state["streams"][str(s)]["rows"] for s in self.rows}


@dataclass
class Run:
    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: StreamCounter
    train_state: TrainState

    def states(self) -> dict:
        return {
            "model": ModelWrapper(self.model),
            "optimizer": OptimizersContainer(self.model, [self.optimizer]),
            "lr_scheduler": self.scheduler,
            "dataloader": PerRankWrapper(self.loader, merge_loader_states),
            "train_state": self.train_state,
        }


def make_run(seed: int, args: ModelArgs = ARGS, rank: int = 0, world_size: int = 1, shard: bool = False) -> Run:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return Run(model, optimizer, scheduler, StreamCounter(rank, world_size), TrainState())


def train(run: Run, steps: int) -> None:
    """A few optimizer steps on tokens drawn from the global torch RNG (so that resume needs it)."""
    for _ in range(steps):
        tokens = torch.randint(0, ARGS.vocab_size, (2, 17))
        run.model(tokens[:, :-1], tokens[:, 1:]).token_loss.mean().backward()
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
        run.loader.advance()
        run.train_state.step += 1
        run.train_state.tokens_seen += tokens.numel()


def full(value):
    value = value.full_tensor() if hasattr(value, "full_tensor") else value
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def snapshot(run: Run) -> dict:
    """Everything a resume must restore, as full (unsharded) values."""
    states = run.states()
    return {
        "model": {k: full(v) for k, v in states["model"].state_dict().items()},
        "optimizer": {k: full(v) for k, v in states["optimizer"].state_dict().items()},
        "lr_scheduler": run.scheduler.state_dict(),
        "loader": run.loader.rows,
        "train_state": (run.train_state.step, run.train_state.tokens_seen),
    }


def draws() -> tuple:
    """The next numbers of the torch and Python RNG streams."""
    return torch.rand(3), random.random()


def assert_equal(got, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_equal(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_equal(g, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), where
    else:
        assert got == expected, where


SETTINGS = dict(interval=1, keep_latest_k=0, async_mode="disabled", load="latest", initial_load_path=None)
"""CheckpointManager's config-owned arguments (it has no defaults for them) as these tests use them."""


def manager(folder: Path, run: Run, **settings) -> CheckpointManager:
    return CheckpointManager(folder, run.states(), **{**SETTINGS, **settings})


def step_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- one process ------------------------------------------------------------------------


def test_round_trip_restores_every_state(tmp_path):
    a = make_run(0)
    train(a, 3)
    saver = manager(tmp_path, a, run_config="[training]\nsteps = 3\n")
    assert saver.save(3)
    expected, expected_draws = snapshot(a), draws()
    train(a, 2)
    after = snapshot(a)

    b = make_run(1)
    assert saver.latest_step() == 3
    resumed = manager(tmp_path, b)
    assert resumed.load() == 3
    assert not resumed.save(3, force=True)  # what was just loaded is not written again
    assert_equal(snapshot(b), expected)
    assert b.loader.loaded["streams"].keys() == {"0", "1", "2", "3"}
    assert_equal(draws(), expected_draws)
    train(b, 2)  # the resumed run continues exactly like the uninterrupted one
    assert_equal(snapshot(b), after)

    assert step_folders(tmp_path) == ["step-00000003"]
    folder = tmp_path / "step-00000003"
    assert (folder / "config.toml").read_text() == "[training]\nsteps = 3\n"
    marker = json.loads((folder / MARKER).read_text())
    assert marker["step"] == 3 and marker["world_size"] == 1 and ".metadata" in marker["files"]


def test_save_follows_interval_and_force(tmp_path):
    run = make_run(0)
    ckpt = manager(tmp_path, run, interval=5)
    assert [ckpt.save(step) for step in range(1, 11)] == [False] * 4 + [True] + [False] * 4 + [True]
    assert ckpt.save(12, force=True)
    assert not ckpt.save(12, force=True)  # the final forced save of a step already saved
    assert step_folders(tmp_path) == ["step-00000005", "step-00000010", "step-00000012"]


def test_keep_latest_k_deletes_exactly_the_oldest_complete(tmp_path):
    run = make_run(0)
    (tmp_path / "step-00000001.partial").mkdir(parents=True)  # incomplete: never deleted
    ckpt = manager(tmp_path, run, interval=2, keep_latest_k=2)
    for step in range(1, 10):
        train(run, 1)
        ckpt.save(step)
    assert step_folders(tmp_path) == ["step-00000001.partial", "step-00000006", "step-00000008"]
    ckpt.save(9, force=True)
    assert step_folders(tmp_path) == ["step-00000001.partial", "step-00000008", "step-00000009"]


def test_async_save_matches_sync_save_and_close_waits(tmp_path):
    run = make_run(0)
    train(run, 2)
    expected = snapshot(run)
    manager(tmp_path / "sync", run).save(2)
    ckpt = manager(tmp_path / "async", run, async_mode="async", keep_latest_k=1)
    assert ckpt.save(2)
    with torch.no_grad():  # the save has staged its copy: training may go on
        for p in run.model.parameters():
            p.add_(1.0)
    run.loader.advance()
    ckpt.close()

    names = {p.name for p in (tmp_path / "sync" / "step-00000002").iterdir()}
    assert names == {p.name for p in (tmp_path / "async" / "step-00000002").iterdir()}
    assert step_folders(tmp_path / "async") == ["step-00000002"]
    for kind in ("sync", "async"):
        fresh = make_run(1)
        assert manager(tmp_path / kind, fresh).load() == 2
        assert_equal(snapshot(fresh), expected, kind)

    ckpt = manager(tmp_path / "async", run, async_mode="async", keep_latest_k=1)
    for step in (3, 4):  # the second save first finishes the first, then deletes older ones
        ckpt.save(step)
    ckpt.close()
    assert step_folders(tmp_path / "async") == ["step-00000004"]


def _move_to_partial(folder: Path) -> None:
    folder.rename(folder.with_name(folder.name + ".partial"))


def _corrupt_metadata(folder: Path) -> None:
    metadata = folder / ".metadata"
    metadata.write_bytes(b"\0" * metadata.stat().st_size)  # same size: only reading it can tell


DAMAGE = {
    "partial": _move_to_partial,
    "metadata_missing": lambda folder: (folder / ".metadata").unlink(),
    "metadata_corrupt": _corrupt_metadata,
    "marker_missing": lambda folder: (folder / MARKER).unlink(),
    "data_truncated": lambda folder: os.truncate(folder / "__0_0.distcp", 100),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    run = make_run(0)
    ckpt = manager(tmp_path, run)
    train(run, 1)
    ckpt.save(1)
    expected = snapshot(run)
    train(run, 1)
    ckpt.save(2)
    DAMAGE[damage](tmp_path / "step-00000002")

    fresh = make_run(1)
    with caplog.at_level(logging.WARNING, logger="titan_lrt.checkpoint"):
        assert manager(tmp_path, fresh).load() == 1
    assert "step-00000002" in caplog.text and "skipping" in caplog.text
    assert_equal(snapshot(fresh), expected)


def _garbage_in_data(folder: Path) -> None:
    data = folder / "__0_0.distcp"
    with open(data, "r+b") as f:  # 4 KB of garbage in the middle: same size, only a checksum can tell
        f.seek(data.stat().st_size // 2)
        f.write(os.urandom(4096))


def _forge_metadata(folder: Path) -> None:
    """A pickle that would create a file when unpickled, with a marker whose checksums match it."""
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(folder.parent / "pwned")))
    write_marker(folder, step=2, world_size=1)


class _Payload:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


CORRUPTION = {
    "data_garbage_same_size": _garbage_in_data,
    "data_truncated": lambda folder: os.truncate(folder / "__0_0.distcp", 100),
    "metadata_missing": lambda folder: (folder / ".metadata").unlink(),
    "metadata_forged": _forge_metadata,
    "marker_garbage": lambda folder: (folder / MARKER).write_bytes(os.urandom(300)),
    "marker_wrong_shape": lambda folder: (folder / MARKER).write_text('{"step": 2, "files": [".metadata"]}'),
    "marker_missing": lambda folder: (folder / MARKER).unlink(),
}


@pytest.mark.parametrize("corruption", CORRUPTION)
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog, corruption):
    run = make_run(0)
    ckpt = manager(tmp_path, run)
    train(run, 1)
    ckpt.save(1)
    expected = snapshot(run)
    train(run, 1)
    ckpt.save(2)
    CORRUPTION[corruption](tmp_path / "step-00000002")

    fresh = make_run(1)
    with caplog.at_level(logging.WARNING, logger="titan_lrt.checkpoint"):
        assert manager(tmp_path, fresh).load() == 1
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "step-00000002" in skipped[0], caplog.text
    assert_equal(snapshot(fresh), expected)
    assert not (tmp_path / "pwned").exists()
    assert (tmp_path / "step-00000002").exists()  # damaged data is kept for a person to look at


def test_no_code_runs_from_a_crafted_checkpoint_folder(tmp_path):
    """A newer step folder holding a pickle payload as .metadata: with no marker, with a forged one,
    and as the path given to checkpoint.load; nothing ever unpickles it."""
    run = make_run(0)
    train(run, 1)
    manager(tmp_path, run).save(1)
    payload = pickle.dumps(_Payload(tmp_path / "pwned"))
    for step in (5, 6):
        folder = tmp_path / f"step-0000000{step}"
        folder.mkdir()
        (folder / ".metadata").write_bytes(payload)
        (folder / "__0_0.distcp").write_bytes(payload)
    write_marker(tmp_path / "step-00000006", step=6, world_size=1)

    assert manager(tmp_path, make_run(1)).load() == 1
    assert manager(tmp_path, make_run(1)).latest_step() == 6  # complete in form: sizes only
    with pytest.raises(ValueError, match=r"metadata is unreadable \(UnpicklingError: refusing io.open"):
        manager(tmp_path, make_run(1), load=str(tmp_path / "step-00000006")).load()
    assert not (tmp_path / "pwned").exists()


class _Holder:
    """A Stateful with one non-tensor value, which DCP stores with torch.save."""

    def __init__(self, value):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_no_code_runs_from_a_crafted_value_in_the_data_file(tmp_path):
    """DCP's own loader torch.loads non-tensor values with weights_only=False; ours refuses globals."""
    run = make_run(0)
    CheckpointManager(
        tmp_path, {"model": ModelWrapper(run.model), "extra": _Holder(_Payload(tmp_path / "pwned"))}, **SETTINGS
    ).save(1)
    assert not (tmp_path / "pwned").exists()
    fresh = CheckpointManager(tmp_path, {"model": ModelWrapper(make_run(1).model), "extra": _Holder(0)}, **SETTINGS)
    with pytest.raises(ValueError, match=r"could not be read: UnpicklingError: .*Unsupported global: GLOBAL io.open"):
        fresh.load()
    assert not (tmp_path / "pwned").exists()
    CheckpointManager(
        tmp_path / "plain", {"model": ModelWrapper(run.model), "extra": _Holder([3, 0.5])}, **SETTINGS
    ).save(500)
    holder = _Holder(None)
    assert (
        CheckpointManager(tmp_path / "plain", {"model": ModelWrapper(run.model), "extra": holder}, **SETTINGS).load()
        == 500
    )
    assert holder.value == [3, 0.5]  # plain values still load


def test_a_checkpoint_with_pickled_per_rank_states_resumes_nothing_but_gives_its_model(tmp_path):
    """Older versions pickled the loader and RNG states: refused with one line, the model still loads."""
    run = make_run(0)
    folder = tmp_path / "old" / "step-00000003"
    state = {"model": ModelWrapper(run.model).state_dict(), "train_state.rank0": pickle.dumps({"step": 3})}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    write_marker(folder, step=3, world_size=1)
    with pytest.raises(ValueError, match=r"holds 'train_state.rank0' as a pickle .* never unpickled"):
        CheckpointManager(
            tmp_path / "old", {"model": ModelWrapper(make_run(1).model), "train_state": TrainState()}, **SETTINGS
        ).load()
    fresh = make_run(1)
    assert (
        CheckpointManager(
            tmp_path / "new",
            {"model": ModelWrapper(fresh.model), "train_state": TrainState()},
            **{**SETTINGS, "initial_load_path": folder},
        ).load()
        == 0
    )
    assert_equal(snapshot(fresh)["model"], snapshot(run)["model"])


def test_per_rank_states_are_json_not_pickle(tmp_path):
    run = make_run(0)
    train(run, 2)
    manager(tmp_path, run).save(2)
    metadata = dcp.FileSystemReader(str(tmp_path / "step-00000002")).read_metadata()
    state = {
        "train_state.rank0": torch.empty(metadata.state_dict_metadata["train_state.rank0"].size, dtype=torch.uint8),
        "dataloader.rank0": torch.empty(metadata.state_dict_metadata["dataloader.rank0"].size, dtype=torch.uint8),
    }
    dcp.load(state, checkpoint_id=str(tmp_path / "step-00000002"), no_dist=True)
    train_state = json.loads(bytes(state["train_state.rank0"].numpy()))
    assert (train_state["step"], train_state["tokens_seen"]) == (2, 2 * 34)
    assert decode_rank_state(state["dataloader.rank0"]) == run.loader.state_dict()
    assert torch.equal(decode_rank_state(state["train_state.rank0"])["rng"]["torch"], torch.get_rng_state())


def test_when_no_step_folder_loads_the_start_fails_instead_of_starting_fresh(tmp_path):
    run = make_run(0)
    ckpt = manager(tmp_path, run)
    for step in (1, 2):
        train(run, 1)
        ckpt.save(step)
    _garbage_in_data(tmp_path / "step-00000001")
    os.truncate(tmp_path / "step-00000002" / "__0_0.distcp", 10)
    fresh = make_run(1)
    before = snapshot(fresh)
    with pytest.raises(
        ValueError,
        match=r"no checkpoint in .* can be loaded \(step-00000002: file __0_0.distcp has 10 "
        r"bytes.*; step-00000001: file __0_0.distcp is damaged: its crc32 is",
    ):
        manager(tmp_path, fresh).load()
    assert_equal(snapshot(fresh), before)
    assert manager(tmp_path, fresh, load="none").load() is None
    with pytest.raises(ValueError, match="no checkpoint in"):
        manager(tmp_path, fresh, load="none").load_latest_good()


def test_load_latest_good_skips_damaged_ones_whatever_the_load_setting(tmp_path):
    run = make_run(0)
    ckpt = manager(tmp_path, run, load="none")
    train(run, 1)
    ckpt.save(1)
    expected = snapshot(run)
    for step in (2, 3):
        train(run, 1)
        ckpt.save(step)
    _garbage_in_data(tmp_path / "step-00000003")
    (tmp_path / "step-00000002" / MARKER).unlink()
    assert ckpt.load_latest_good() == 1  # the rollback of the trainer: same manager, same states
    assert_equal(snapshot(run), expected)


def test_leftovers_of_interrupted_saves_and_deletions_are_removed_on_load(tmp_path, caplog):
    run = make_run(0)
    ckpt = manager(tmp_path, run, keep_latest_k=1)
    train(run, 1)
    ckpt.save(1)
    expected = snapshot(run)
    (tmp_path / "step-00000002.partial").mkdir()  # a save killed while writing
    (tmp_path / "step-00000002.partial" / "__0_0.distcp").write_bytes(b"x" * 100)
    (tmp_path / "step-00000000.deleting").mkdir()  # a keep_latest_k deletion killed after its rename
    (tmp_path / "step-00000000").mkdir()  # one killed by an older version: only the marker was left
    shutil.copy(tmp_path / "step-00000001" / MARKER, tmp_path / "step-00000000" / MARKER)
    (tmp_path / "step-00000003.bak").mkdir()  # not ours: kept

    fresh = make_run(1)
    with caplog.at_level(logging.WARNING, logger="titan_lrt.checkpoint"):
        assert manager(tmp_path, fresh).load() == 1
    assert_equal(snapshot(fresh), expected)
    assert step_folders(tmp_path) == ["step-00000001", "step-00000003.bak"]
    assert "step-00000002.partial" in caplog.text and "holds only complete.json" in caplog.text


def test_pruning_never_leaves_a_step_folder_with_part_of_its_files(tmp_path, monkeypatch):
    run = make_run(0)
    ckpt = manager(tmp_path, run, keep_latest_k=1)
    ckpt.save(1)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the process dies after deleting one file
        path = Path(path)
        if path.name.startswith("step-00000001"):
            next(p for p in path.iterdir() if p.name != MARKER).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert step_folders(tmp_path) == ["step-00000001.deleting", "step-00000002"]
    assert manager(tmp_path, make_run(1)).load() == 2
    assert step_folders(tmp_path) == ["step-00000002"]


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_states_are_never_saved(tmp_path, caplog, where):
    run = make_run(0)
    ckpt = manager(tmp_path, run)
    train(run, 1)
    ckpt.save(1)
    train(run, 1)
    with torch.no_grad():
        if where == "model":
            run.model.layers[1].attention.wq.weight[3, 5] = float("nan")
        else:
            run.optimizer.state[run.model.lm_head.weight]["exp_avg_sq"][0, 0] = float("inf")
    with caplog.at_level(logging.ERROR, logger="titan_lrt.checkpoint"):
        assert not ckpt.save(2)
    key = "model.layers.1.attention.wq.weight" if where == "model" else "optimizer.state.lm_head.weight.exp_avg_sq"
    assert (
        caplog.records[-1]
        .getMessage()
        .startswith(f"checkpoint step 2 NOT saved: non-finite values (nan/inf) in '{key}'")
    )
    assert ckpt.refused == caplog.records[-1].getMessage()
    assert step_folders(tmp_path) == ["step-00000001"]
    assert manager(tmp_path, make_run(1)).load() == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only); None where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, check=False
    ).returncode:
        yield None
        return
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_a_full_disk_says_so_and_the_next_start_resumes(tmp_path, small_disk, monkeypatch, how):
    run = make_run(0)
    if how == "tmpfs":
        if small_disk is None:
            pytest.skip("mounting a tmpfs is not allowed here")
        folder = small_disk
        (folder / "filler").write_bytes(b"\0" * (3 * 2**20))  # leaves 1 MB: too small for the 2 MB checkpoint
    else:  # the writer fails the way a full disk makes it fail
        folder = tmp_path / "run"
        real_save = dcp.save

        def full_disk(*args, **kwargs):
            real_save(*args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(dcp, "save", full_disk)
    ckpt = manager(folder, run)
    with pytest.raises(
        OSError,
        match=r"no space left on device: checkpoint step 1 could not be written to "
        r".*step-00000001.partial \(this rank's states take [\d.]+ MB, [\d.]+ MB",
    ):
        ckpt.save(1)
    assert [p.name for p in folder.iterdir() if p.name.startswith("step")] == []  # nothing half-written is left
    monkeypatch.undo()
    if how == "tmpfs":
        (folder / "filler").unlink()
    train(run, 1)
    manager(folder, run).save(1)
    expected = snapshot(run)
    fresh = make_run(1)
    assert manager(folder, fresh).load() == 1
    assert_equal(snapshot(fresh), expected)


def test_load_none_starts_fresh_even_with_checkpoints(tmp_path):
    run = make_run(0)
    train(run, 1)
    manager(tmp_path, run).save(1)
    fresh = make_run(1)
    before = snapshot(fresh)
    assert manager(tmp_path, fresh, load="none").load() is None
    assert_equal(snapshot(fresh), before)
    assert manager(tmp_path / "empty", fresh).load() is None  # latest, nothing there


def test_saving_an_existing_step_replaces_it(tmp_path, caplog):
    old, new = make_run(0), make_run(1)
    manager(tmp_path, old).save(1)
    with caplog.at_level(logging.WARNING, logger="titan_lrt.checkpoint"):
        manager(tmp_path, new, load="none").save(1)
    assert "replacing" in caplog.text and "step-00000001" in caplog.text
    assert step_folders(tmp_path) == ["step-00000001"]
    fresh = make_run(2)
    manager(tmp_path, fresh).load()
    assert_equal(snapshot(fresh)["model"], snapshot(new)["model"])


def test_load_path_and_step_load_that_checkpoint(tmp_path):
    run = make_run(0)
    ckpt = manager(tmp_path, run)
    train(run, 1)
    ckpt.save(1)
    expected = snapshot(run)
    train(run, 1)
    ckpt.save(2)
    fresh = make_run(1)
    assert manager(tmp_path, fresh, load=str(tmp_path / "step-00000001")).load() == 1
    assert_equal(snapshot(fresh), expected)
    fresh = make_run(1)
    assert manager(tmp_path, fresh).load(step=1) == 1
    assert_equal(snapshot(fresh), expected)


def test_bad_settings_and_paths_fail_early_with_clear_errors(tmp_path):
    run = make_run(0)
    manager(tmp_path, run).save(1)
    (tmp_path / "step-00000002.partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"does not exist.*step-00000001.*'latest' / 'none'"):
        manager(tmp_path, run, load=str(tmp_path / "step-00000007"))
    with pytest.raises(ValueError, match=r"no complete.json marker.*it contains: step-00000001, step-00000002.partial"):
        manager(tmp_path, run, load=str(tmp_path))
    with pytest.raises(ValueError, match=r"'\.partial': a save that has not finished"):
        manager(tmp_path, run, load=str(tmp_path / "step-00000002.partial"))
    with pytest.raises(FileNotFoundError, match="initial_load_path"):
        manager(tmp_path / "new", run, initial_load_path=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"load\(step\)=.*step-00000005.*does not exist"):
        manager(tmp_path, run).load(step=5)
    # settings are checked where the config is loaded, before any checkpoint work
    with pytest.raises(ConfigError, match=r"async_mode='threads'.*; allowed: disabled, async, async_process"):
        load_config(["--checkpoint.async_mode=threads"])
    with pytest.raises(ValueError, match="async_process' needs torch.distributed"):
        manager(tmp_path, run, async_mode="async_process")
    with pytest.raises(ConfigError, match="checkpoint.interval=0 must be >= 1"):
        load_config(["--checkpoint.interval=0"])
    with pytest.raises(ConfigError, match="checkpoint.keep_latest_k=-1 must be >= 0"):
        load_config(["--checkpoint.keep_latest_k=-1"])
    with pytest.raises(ValueError, match="must include 'model'"):
        CheckpointManager(tmp_path, {"optimizer": run.optimizer}, **SETTINGS)


@pytest.mark.parametrize(
    "args, message",
    [
        (ModelArgs(dim=128), r"key 'tok_embeddings.weight' has shape \(512, 64\) in the checkpoint and \(512, 128\)"),
        (ModelArgs(lrt=LRTArgs(mode="interleaved")), r"model key '.*' \(shape .*\) is not in the checkpoint"),
        (ModelArgs(n_layers=1), r"checkpoint key 'layers.1.\S+' \(\d+ such keys in all\) is not in the model"),
    ],
)
def test_model_mismatch_names_the_key_and_shapes(tmp_path, args, message):
    manager(tmp_path, make_run(0)).save(1)
    other = make_run(0, args)
    before = snapshot(other)
    with pytest.raises(ValueError, match=message):
        manager(tmp_path, other).load()
    assert_equal(snapshot(other), before)


def test_initial_load_takes_model_weights_only(tmp_path):
    source = make_run(0)
    train(source, 3)
    manager(tmp_path / "pretrained", source).save(3)
    path = tmp_path / "pretrained" / "step-00000003"

    run = make_run(1)
    assert manager(tmp_path / "run", run, initial_load_path=path).load() == 0
    fresh = all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in run.optimizer.state.values())
    assert fresh and run.scheduler.last_epoch == 0  # the states every optimizer starts with, not the checkpoint's
    assert run.loader.loaded is None and run.train_state == TrainState()
    expected = snapshot(source)
    assert_equal(snapshot(run)["model"], expected["model"])

    run = make_run(1)
    assert manager(tmp_path / "run", run, initial_load_path=path, initial_load_model_only=False).load() == 3
    assert_equal(snapshot(run), expected)

    own = make_run(2)
    train(own, 1)
    manager(tmp_path / "run", own).save(1)  # a checkpoint of the run itself wins
    run = make_run(1)
    assert manager(tmp_path / "run", run, initial_load_path=path).load() == 1
    assert_equal(snapshot(run), snapshot(own))


def test_model_only_checkpoint_cannot_resume_everything(tmp_path):
    run = make_run(0)
    CheckpointManager(tmp_path, {"model": ModelWrapper(run.model)}, **SETTINGS).save(1)
    with pytest.raises(ValueError, match=r"has no 'optimizer' state \(it holds: model\)"):
        manager(tmp_path, make_run(1)).load()


def test_checkpoint_imports_nothing_from_train_or_data():
    import ast

    import titan_lrt.checkpoint

    tree = ast.parse(Path(titan_lrt.checkpoint.__file__).read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        assert not [n for n in names if n.startswith(("titan_lrt.train", "titan_lrt.data"))], names


# ---- two processes ----------------------------------------------------------------------


def _worker(root: str) -> None:
    """One rank of a 2-process gloo run with an FSDP2 model: saves with per-rank loader and RNG
    states (thread and process async), then loads them, and a 1-process checkpoint, back."""
    root = Path(root)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    run = make_run(0, rank=rank, world_size=world_size, shard=True)
    torch.manual_seed(100 + rank)  # each rank draws its own batches
    ckpt = manager(root / "two", run, async_mode="async")
    for step in (1, 2):
        train(run, 1)
        ckpt.save(step)
        dist.all_reduce(torch.ones(1))  # the trainer's collectives go on while the save writes
    ckpt.close()
    ckpt = manager(root / "two_process", run, async_mode="async_process")
    ckpt.save(2)
    ckpt.close()
    expected, expected_draws = snapshot(run), draws()
    torch.save({"snapshot": expected, "draws": expected_draws}, root / f"expected{rank}.pt")

    for folder in ("two", "two_process"):
        fresh = make_run(1, rank=rank, world_size=world_size, shard=True)
        assert manager(root / folder, fresh).load() == 2
        assert_equal(snapshot(fresh), expected, folder)
        assert_equal(draws(), expected_draws, folder)
        assert fresh.loader.loaded["streams"].keys() == {"0", "1", "2", "3"}

    single = torch.load(root / "single_expected.pt")
    fresh = make_run(1, rank=rank, world_size=world_size, shard=True)
    assert manager(root / "single", fresh).load() == 1
    got = snapshot(fresh)
    assert_equal(got["model"], single["model"])
    assert_equal(got["optimizer"], single["optimizer"])
    assert got["loader"] == {s: 1 for s in range(rank, NUM_STREAMS, world_size)}
    assert got["train_state"] == single["train_state"]
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's teardown at interpreter exit, which can abort


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world_size: int, root: Path, timeout: float = 120) -> None:
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    code = f"import test_checkpoint; test_checkpoint._worker({str(root)!r})"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for r, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"


def test_per_rank_states_across_world_sizes(tmp_path):
    single = make_run(0)
    train(single, 1)
    manager(tmp_path / "single", single).save(1)
    expected = snapshot(single)
    torch.save(expected, tmp_path / "single_expected.pt")

    _run_ranks(2, tmp_path)  # saves with 2 ranks, loads into 2 ranks (also the 1-rank checkpoint)

    keys = set(dcp.FileSystemReader(str(tmp_path / "two" / "step-00000002")).read_metadata().state_dict_metadata)
    assert {"dataloader.rank0", "dataloader.rank1", "train_state.rank0", "train_state.rank1"} <= keys
    rank0 = torch.load(tmp_path / "expected0.pt")
    for folder in ("two", "two_process"):  # load the 2-rank checkpoints into 1 process
        run = make_run(1)
        assert manager(tmp_path / folder, run).load() == 2
        got = snapshot(run)
        assert_equal(got["model"], rank0["snapshot"]["model"], folder)
        assert_equal(got["optimizer"], rank0["snapshot"]["optimizer"], folder)
        assert got["loader"] == {s: 2 for s in range(NUM_STREAMS)}  # streams of both ranks
        assert got["train_state"] == rank0["snapshot"]["train_state"]
        assert_equal(draws(), rank0["draws"], folder)
