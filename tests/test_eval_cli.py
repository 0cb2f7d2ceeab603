"""Loading a checkpoint written by the trainer, and the evaluation command end to end."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args as trainer_args

from titan_lrt.checkpoint import write_marker
from titan_lrt.config import load_config
from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.eval.cli import main as eval_main
from titan_lrt.export import load_model
from titan_lrt.model.schedule import run_schedule
from titan_lrt.preemption import StopRequest
from titan_lrt.train import Trainer

BUNDLE = Path(__file__).parent / "data" / "core_bundle"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(trained_run):
    """The shared 2-step run: its trainer and its step folder."""
    trainer, dump = trained_run
    return trainer, dump / "checkpoints" / "step-00000002"


def test_loading_a_trainer_checkpoint_gives_the_saved_models_logits(trained):
    trainer, step_folder = trained
    loaded = load_model(step_folder)
    assert loaded.step == 2 and not loaded.model.training
    assert loaded.tokenizer.vocab_size == trainer.tokenizer.vocab_size
    assert loaded.config.lrt.num_subsets == 2
    tokens = torch.randint(1, trainer.tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = run_schedule(trainer.model, tokens).logits
        got = run_schedule(loaded.model, tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert load_model(step_folder.parent.parent).path == step_folder  # the run folder: its newest step


def test_a_relative_tokenizer_path_is_found_above_the_checkpoint(trained, tmp_path, monkeypatch):
    """A run started in a project folder names its tokenizer relative to it; evaluating from
    elsewhere still finds it, in a folder above the checkpoint."""
    trainer, step_folder = trained
    project = tmp_path / "project"
    copy = project / "outputs" / "run" / "checkpoints" / step_folder.name
    shutil.copytree(step_folder, copy)
    shutil.copy(trainer.config.model.tokenizer_path, project / "tok.json")
    config = copy / "config.toml"
    config.write_text(config.read_text().replace(trainer.config.model.tokenizer_path, "tok.json"))
    marker = json.loads((copy / "complete.json").read_text())
    marker["files"]["config.toml"] = config.stat().st_size
    (copy / "complete.json").write_text(json.dumps(marker))
    monkeypatch.chdir(tmp_path)
    assert load_model(copy).tokenizer.vocab_size == trainer.tokenizer.vocab_size


def test_loading_errors_name_the_problem(trained, tmp_path):
    _, step_folder = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(step_folder, tokenizer_path=tmp_path / "missing.json")


def test_evaluate_command_end_to_end(trained, tmp_path, capsys):
    _, step_folder = trained
    out = tmp_path / "eval.json"
    code = eval_main(
        [
            "--checkpoint",
            str(step_folder),
            "--batches",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--exact-sequences",
            "3",
            "--icl",
            "--icl-examples",
            "4",
            "--core",
            str(BUNDLE),
            "--core-max-per-task",
            "2",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for text in ("bits per byte", "merged - exact", "evaluation speed", "in-context learning", "CORE"):
        assert text in printed, text
    report = json.loads(out.read_text())
    assert report["step"] == 2
    scores = report["bpb"]["scores"]
    assert set(scores) == {"merged", "pass0", "pass1", "pass2", "zero", "exact", "merged_on_exact_sample"}
    assert scores["zero"]["bpb"] == pytest.approx(scores["pass0"]["bpb"], rel=1e-5)
    assert [b["positions"] for b in scores["merged"]["buckets"]] == ["0-31"]
    assert report["bpb"]["merged_minus_exact"] == pytest.approx(
        scores["merged_on_exact_sample"]["bpb"] - scores["exact"]["bpb"]
    )
    assert report["bpb"]["throughput"]["exact"]["tokens"] == 3 * 32
    assert set(report["icl"]["tasks"]) == {"recall", "copy", "mapping"}
    assert set(report["icl"]["tasks"]["copy"]) == {"exact", "zero", "schedule"}
    assert len(report["core"]["tasks"]) == 5 and -1 <= report["core"]["core"] <= 1


def test_evaluate_command_reports_bad_input_without_a_traceback(trained, tmp_path, capsys):
    _, step_folder = trained
    assert eval_main(["--checkpoint", str(step_folder), "--modes", "none", "--core", str(tmp_path)]) == 2
    assert "no core.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--checkpoint", str(step_folder), "--modes", "merged,fast"])
    assert "allowed a comma-separated list" in capsys.readouterr().err


def test_a_run_folder_carries_its_tokenizer(small_data, tmp_path):
    """A run stays loadable after the tokenizer it was trained with is gone: the trainer keeps a copy."""
    corpus, tokenizer = small_data
    private = tmp_path / "private_tokenizer.json"
    shutil.copyfile(tokenizer, private)
    dump = tmp_path / "run"
    config, _ = load_config(trainer_args((corpus, private), dump, "--training.steps=2", "--checkpoint.interval=2"))
    Trainer(config).train(StopRequest())
    assert (dump / "tokenizer.json").read_bytes() == private.read_bytes()
    private.unlink()
    loaded = load_model(dump)
    assert loaded.tokenizer.vocab_size == Tokenizer.from_file(tokenizer).vocab_size


class _Payload:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_the_evaluation_command_runs_no_code_from_a_crafted_step_folder(trained, tmp_path):
    """A newer step folder whose .metadata is a pickle that would create a file, with a marker whose
    checksums match: `python -m titan_lrt.eval` skips it, naming it, and evaluates the older one."""
    _, step_folder = trained
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(step_folder, checkpoints / step_folder.name)
    crafted = checkpoints / "step-00000009"
    crafted.mkdir()
    pwned = tmp_path / "pwned"
    (crafted / ".metadata").write_bytes(pickle.dumps(_Payload(pwned)))
    write_marker(crafted, step=9, world_size=1)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "titan_lrt.eval",
            "--checkpoint",
            str(tmp_path / "run"),
            "--modes",
            "none",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "eval.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not pwned.exists()
    assert "skipping" in result.stderr and "step-00000009" in result.stderr and "refusing io.open" in result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 2


def test_the_held_out_sample_follows_the_data_seed(trained, small_data, tmp_path):
    """Runs of different training seeds are scored on the same sequences when given one --data-seed."""
    _, step_folder = trained
    corpus, _ = small_data  # its train split: enough documents for the seed to pick others

    def merged(*extra):
        out = tmp_path / "eval.json"
        argv = ["--checkpoint", str(step_folder), "--batches", "1", "--batch-size", "2", "--seq-len", "32"]
        argv += ["--data", str(corpus), "--split", "train"]
        assert eval_main([*argv, "--modes", "merged", "--no-progress", "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())["bpb"]["scores"]["merged"]["bpb"]

    run_seed = merged()
    assert merged("--data-seed", "0") == run_seed  # the trained run's seed is 0
    assert merged("--data-seed", "7") != run_seed
    assert merged("--data-seed", "7") == merged("--data-seed", "7")
