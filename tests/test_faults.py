"""The trainer's failure paths: non-finite updates, loss spikes (stop, rollback), settings changed
at resume, Ctrl-C. Tiny models, a few steps; real signals in real processes."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import scalars, tiny_args
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan_lrt.config import load_config
from titan_lrt.guards import LossSpikeError, LossSpikeGuard, nonfinite_count
from titan_lrt.metrics import ThroughputWindow
from titan_lrt.preemption import ABORT_EXIT_CODE, StopRequest
from titan_lrt.resume_settings import flat_settings, kept_global_batch, refusal, resolved_global_batch, settings_diff
from titan_lrt.train import Trainer, main

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- units --------------------------------------------------------------------------------


def test_spike_guard_flags_losses_above_factor_times_the_running_mean_for_patience_steps():
    guard = LossSpikeGuard(factor=2.0, patience=3)
    assert [guard.observe(s, 6.0) for s in (1, 2, 3)] == [False] * 3
    assert guard.mean == pytest.approx(6.0)  # bias-corrected: the mean of equal losses is that loss
    assert not guard.observe(4, 11.9)  # below 2 x 6: not flagged, enters the mean
    mean = guard.mean
    # exponential average with decay 0.98, divided by its weight 1 - 0.98^4
    assert mean == pytest.approx(0.02 * (6 * (0.98**3 + 0.98**2 + 0.98) + 11.9) / (1 - 0.98**4), rel=1e-12)
    assert not guard.observe(5, 100.0) and guard.suspicious and guard.first_flagged == 5
    assert not guard.observe(6, 100.0)
    assert guard.mean == mean  # flagged losses stay out of the mean
    assert guard.observe(7, 100.0)  # the third flag in a row: a spike
    guard.reset_flags()
    assert not guard.suspicious
    assert not guard.observe(8, 100.0) and not guard.observe(9, 1.0)  # an unflagged loss ends the run of flags
    assert not guard.suspicious and guard.first_flagged is None
    assert not guard.observe(10, float("nan"))  # non-finite losses are training.nonfinite's


def test_nonfinite_count_sees_nan_and_inf_but_not_huge_finite_values():
    huge = torch.full((3, 3), 3e38)
    assert float(nonfinite_count([huge, torch.ones(2)])) == 0.0
    assert float(nonfinite_count([torch.ones(2), torch.tensor([1.0, float("inf")])])) == 1.0
    assert float(nonfinite_count([torch.tensor([float("nan")]), torch.zeros(0)])) == 1.0


def test_settings_diff_and_what_a_resume_refuses():
    saved = flat_settings('[optimizer]\nlr = 0.01\nname = "adamw"\n[model]\nvocab_size = 512\n')
    assert saved == {"optimizer.lr": 0.01, "optimizer.name": "adamw", "model.vocab_size": 512}
    lr_only = settings_diff(saved, {**saved, "optimizer.lr": 0.001, "metrics.new_key": 1})
    assert lr_only == {"metrics.new_key": (None, 1), "optimizer.lr": (0.01, 0.001)}
    assert refusal(lr_only) is None
    vocab = settings_diff(saved, {**saved, "model.vocab_size": 1024})
    assert refusal(vocab).startswith("model.vocab_size changed at resume (512 -> 1024)")
    assert refusal(settings_diff(saved, {**saved, "optimizer.name": "muon"})).startswith("optimizer.name changed")
    assert refusal(settings_diff(saved, {**saved, "model.tokenizer_path": "/moved/tok.json"})) is None
    assert refusal(settings_diff(saved, {**saved, "lrt.new_option": 1})) is None  # a key of newer code


def test_a_resume_on_fewer_ranks_keeps_the_global_batch():
    two_ranks = {
        "training.global_batch_size": 0,
        "training.local_batch_size": 4,
        "parallelism.context_parallel_degree": 1,
    }
    assert resolved_global_batch(two_ranks, 2) == 8
    # one rank now: 4 sequences per micro-batch, the checkpoint's 8 kept (2 micro-batches)
    assert kept_global_batch(two_ranks, 2, two_ranks, current_global=4) == 8
    assert kept_global_batch(two_ranks, 2, two_ranks, current_global=8) is None  # nothing changed
    explicit = {**two_ranks, "training.global_batch_size": 16}
    assert kept_global_batch(two_ranks, 2, explicit, current_global=16) is None  # the user's choice applies
    cp = {**two_ranks, "parallelism.context_parallel_degree": 2}
    assert resolved_global_batch(cp, 4) == 8  # 4 ranks, 2 data-parallel groups


def test_the_tokens_per_second_window_leaves_out_evaluation_and_checkpoint_time():
    window = ThroughputWindow()
    time.sleep(0.05)  # training
    window.add(1000)
    with window.excluded():  # an evaluation or a save
        time.sleep(0.5)
    rate = window.rate().tokens
    assert 1000 / 0.5 < rate <= 1000 / 0.05
    window.add(10)
    assert window.rate().tokens > 1000  # a new window: 10 tokens in microseconds


# ---- non-finite updates and loss spikes ------------------------------------------------------


def _checkpoint_tensors(step_folder):
    out = step_folder.parent / (step_folder.name + ".pt")
    dcp_to_torch_save(str(step_folder), str(out))
    state = torch.load(out, weights_only=False)
    flat = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            flat.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(state)
    return flat


def test_an_update_that_overflows_the_weights_stops_before_any_checkpoint_holds_them(small_data, tmp_path, capsys):
    code = main(
        tiny_args(
            small_data,
            tmp_path,
            "--optimizer.lr=1e38",
            "--training.steps=4",
            "--checkpoint.interval=1",
            "--training.nonfinite=skip",
        )
    )
    out = capsys.readouterr().out
    assert code == 3, out
    assert "non-finite parameters after the optimizer step of step 1" in out
    assert "Traceback" not in out
    folders = sorted((tmp_path / "checkpoints").glob("step-*")) if (tmp_path / "checkpoints").exists() else []
    for folder in folders:  # none expected: the very first update overflowed
        assert all(torch.isfinite(t).all() for t in _checkpoint_tensors(folder) if t.is_floating_point()), folder
    assert folders == []


def test_a_diverging_learning_rate_stops_on_the_loss_spike_with_exit_code_3(small_data, tmp_path, capsys):
    """lr=1e6: the loss jumps to ~3x its start, then the model is dead (gradient norm 0)."""
    code = main(
        tiny_args(small_data, tmp_path, "--optimizer.lr=1e6", "--training.steps=6", "--training.spike_patience=1")
    )
    out = capsys.readouterr().out
    assert code == 3, out
    assert "loss spike: loss" in out and "Stopping" in out
    assert scalars(tmp_path / "tb", "guard/loss_spike") == {2: 1.0}
    assert not (tmp_path / "checkpoints" / "step-00000006").exists()


def _poison_the_update_of_step(trainer, bad_step):
    """A one-off corrupted update (as a bad batch or a bit flip would make): the LM head flipped and
    scaled 1000x (confidently wrong predictions)."""
    step_once = trainer.optimizers.step
    done = []

    def step():
        step_once()
        if trainer.state.step + 1 == bad_step and not done:
            done.append(True)
            with torch.no_grad():
                trainer.model.lm_head.weight.mul_(-1000.0)

    trainer.optimizers.step = step


def _record_logged(trainer):
    logged = []
    log = trainer.metrics.log

    def record(step, values, line=None):
        logged.append((step, dict(values)))
        log(step, values, line)

    trainer.metrics.log = record
    return logged


@pytest.mark.parametrize("action", ["stop", "rollback"])
def test_a_loss_spike_stops_or_rolls_back_past_the_bad_batches(small_data, tmp_path, action):
    config, _ = load_config(
        tiny_args(
            small_data,
            tmp_path,
            "--training.steps=12",
            "--checkpoint.interval=2",
            "--training.spike_patience=2",
            f"--training.spike_action={action}",
        )
    )
    trainer = Trainer(config)
    _poison_the_update_of_step(trainer, 7)  # the losses of steps 8 and 9 spike
    logged = _record_logged(trainer)
    if action == "stop":
        with pytest.raises(LossSpikeError, match="loss spike: loss .* at step 9.*since step 8"):
            trainer.train(StopRequest())
        assert trainer.checkpointer.latest_step() == 6  # the step-8 save was held: its loss was flagged
        return
    trainer.train(StopRequest())
    losses = [(s, v["loss/total"]) for s, v in logged if "loss/total" in v]
    assert [s for s, _ in losses] == [*range(1, 10), *range(7, 13)]  # steps 7..9 again after the rollback
    assert [v for s, v in logged if "guard/rollback_to_step" in v] == [{"guard/rollback_to_step": 6.0}]
    assert [s for s, v in logged if "guard/loss_spike" in v] == [9]
    first_7, again_7 = losses[6][1], losses[9][1]
    assert again_7 != first_7  # same weights (step 6), other batches: the spike's batches were skipped
    assert losses[-1][1] < 1.5 * losses[5][1]  # trained on normally after the rollback
    assert (tmp_path / "checkpoints" / "step-00000012" / "complete.json").is_file()


# ---- settings changed at resume -------------------------------------------------------------


@pytest.fixture(scope="module")
def four_steps(small_data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (lr 0.01, warmup 2, no decay)."""
    dump = tmp_path_factory.mktemp("four_steps")
    assert main(tiny_args(small_data, dump, "--training.steps=4", "--checkpoint.interval=2")) == 0
    return dump


def _copy_run(source, dump):
    shutil.copytree(source / "checkpoints", dump / "checkpoints")


def test_a_new_learning_rate_at_resume_is_printed_and_applied(small_data, four_steps, tmp_path, capsys):
    _copy_run(four_steps, tmp_path)
    code = main(tiny_args(small_data, tmp_path, "--training.steps=6", "--optimizer.lr=0.005"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "resumed from step 4" in out
    assert "optimizer.lr: 0.01 -> 0.005" in out and "training.steps: 4 -> 6" in out
    lrs = scalars(tmp_path / "tb", "optim/lr")
    assert lrs[5] == pytest.approx(0.005) and lrs[6] == pytest.approx(0.005)  # after the warmup, no decay


def test_a_changed_vocab_size_at_resume_is_refused_naming_the_key(small_data, four_steps, tmp_path, capsys):
    _copy_run(four_steps, tmp_path)
    code = main(tiny_args(small_data, tmp_path, "--training.steps=6", "--model.vocab_size=1024"))
    out = capsys.readouterr().out
    assert code == 2
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "model.vocab_size changed at resume (8192 -> 1024)" in errors[0], out
    assert not (tmp_path / "checkpoints" / "step-00000006").exists()


# ---- Ctrl-C ------------------------------------------------------------------------------


def test_a_second_ctrl_c_aborts_at_once():
    program = (
        "import os, signal, time\n"
        "from titan_lrt.preemption import StopRequest\n"
        "stop = StopRequest()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "assert stop.signal_name == 'SIGINT', stop.signal_name\n"
        "print('first Ctrl-C recorded', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('still running')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == ABORT_EXIT_CODE == 130, out.stdout + out.stderr
    assert "first Ctrl-C recorded" in out.stdout and "still running" not in out.stdout
    assert "second Ctrl-C: aborting now" in out.stderr and "Traceback" not in out.stderr
