"""The trainer end to end: loss falls, TensorBoard logs, kill -9 and exact resume, the launcher."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import scalars, tiny_args

from titan_lrt.config import load_config
from titan_lrt.preemption import StopRequest
from titan_lrt.train import Trainer, main

ROOT = Path(__file__).resolve().parent.parent


def test_short_run_loss_falls_and_logs_to_tensorboard(small_data, tmp_path):
    torch.set_num_threads(2)
    config, _ = load_config(
        tiny_args(
            small_data,
            tmp_path,
            "--training.steps=40",
            "--eval.interval=40",
            "--eval.exact_sequences=1",
            "--training.global_batch_size=8",
        )
    )
    trainer = Trainer(config)
    assert trainer.grad_accum == 2
    trainer.resume()
    trainer.train(StopRequest())
    losses = scalars(tmp_path / "tb", "loss/total")
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    for tag in (
        "loss/pass0",
        "loss/pass2",
        "loss/merged_minus_pass0",
        "lrt/gamma_mean",
        "lrt/gate_feedback_pass1",
        "optim/lr",
        "optim/grad_norm",
        "throughput/tokens_per_s",
        "val/bpb_merged",
        "val/bpb_exact",
    ):
        assert scalars(tmp_path / "tb", tag), tag
    assert (tmp_path / "checkpoints" / "step-00000040" / "complete.json").is_file()
    assert (tmp_path / "checkpoints" / "step-00000040" / "config.toml").is_file()


def _run(args, **kw):
    return subprocess.run(
        [sys.executable, str(ROOT / "run_train.sh"), *args], capture_output=True, text=True, timeout=300, **kw
    )


def test_kill_minus_nine_then_rerun_resumes_the_exact_loss_curve(small_data, tmp_path):
    steps = "--training.steps=24"
    reference = _run(tiny_args(small_data, tmp_path / "ref", steps))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    expected = scalars(tmp_path / "ref" / "tb", "loss/total")

    dump = tmp_path / "run"
    args = tiny_args(small_data, dump, steps, "--checkpoint.interval=4", "--data.num_workers=1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_train.sh"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 240
    while not (dump / "checkpoints" / "step-00000008" / "complete.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a save that a crash interrupted, newer than the complete ones
    (dump / "checkpoints" / "step-00000099.partial").mkdir()

    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stdout
    assert "step-00000099.partial" in resumed.stdout + resumed.stderr
    start = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert start >= 8
    got = scalars(dump / "tb", "loss/total")
    for step in range(start + 1, 25):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_finishes_the_step_saves_and_exits_cleanly(small_data, tmp_path, sig):
    """The signal goes to the whole process group, data-loader worker included (as
    torchrun and SLURM deliver it; Ctrl-C in a terminal too)."""
    args = tiny_args(
        small_data, tmp_path, "--training.steps=100000", "--checkpoint.interval=100000", "--data.num_workers=1"
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_train.sh"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "tb").exists() or not scalars_or_empty(tmp_path / "tb"):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert f"{sig.name} on some rank: saving step" in output
    assert "Traceback" not in output
    step = int(output.split("saving step ")[1].split()[0])
    assert (tmp_path / "checkpoints" / f"step-{step:08d}" / "complete.json").is_file()


def scalars_or_empty(tb_folder):
    try:
        return scalars(tb_folder, "loss/total")
    except KeyError:
        return {}


def test_bad_config_fails_fast_with_exit_code_2(small_data, tmp_path, capsys):
    code = main(tiny_args(small_data, tmp_path, "--training.stepz=3"))
    assert code == 2
    assert "unknown key training.stepz (did you mean 'steps'?)" in capsys.readouterr().out
    code = main(tiny_args(small_data, tmp_path, "--data.dataset=/no/such/folder"))
    assert code == 2
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("launch", ["shell", "torchrun_python", "torchrun_no_python"])
def test_run_train_sh_works_as_shell_script_and_as_python(small_data, tmp_path, launch):
    args = tiny_args(small_data, tmp_path, "--training.steps=2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    command = {
        "shell": [str(ROOT / "run_train.sh"), *args],
        "torchrun_python": [*torchrun, str(ROOT / "run_train.sh"), *args],
        "torchrun_no_python": [*torchrun, "--no-python", str(ROOT / "run_train.sh"), *args],
    }[launch]
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "step      2" in out.stdout
    assert json.loads((tmp_path / "checkpoints" / "step-00000002" / "complete.json").read_text())["step"] == 2
