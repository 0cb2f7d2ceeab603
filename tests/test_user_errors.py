"""User errors end in one line that names the file, row or key and the fix, exit code 2, no traceback:
bad data made as real files, checked up front or at the bad row (the last checkpoint intact), and
through the launcher (`./run_train.sh`, torchrun), whose last line is the trainer's message."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_args

from titan_lrt.data.streams import DOCS_PER_CHUNK, stream_document_order
from titan_lrt.train import CUBLAS_DETERMINISTIC_WORKSPACE, Trainer, main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def texts(n: int) -> list[str]:
    return [f"document {i} says hello to the world, and the world says hello back. " * 3 for i in range(n)]


def write_jsonl(path: Path, rows: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(row + b"\n" for row in rows))
    return path


def jsonl_rows(n: int) -> list[bytes]:
    return [json.dumps({"text": t}).encode() for t in texts(n)]


def missing_column(folder: Path) -> str:
    folder.mkdir()
    pq.write_table(pa.table({"content": texts(8)}), folder / "train.parquet")
    return str(folder)


def malformed_jsonl_line(folder: Path) -> str:
    rows = jsonl_rows(8)
    rows[5] = b'{"text": "an unterminated string}'
    return str(write_jsonl(folder / "train.jsonl", rows).parent)


def non_utf8_txt(folder: Path) -> str:
    folder.mkdir()
    for i, text in enumerate(texts(6)):
        (folder / f"doc{i}.txt").write_text(text)
    (folder / "doc3.txt").write_bytes(b"caf\xe9 au lait\n" * 20)  # latin-1, not UTF-8
    return str(folder)


def empty_documents(folder: Path) -> str:
    return str(write_jsonl(folder / "train.jsonl", [b'{"text": ""}'] * 8).parent)


# (how to make the data, what the one line must say)
BAD_DATA = {
    "missing_column": (
        missing_column,
        r"error: text column 'text' not found in .*/bad\[train\]; "
        r"available columns: \['content'\]; set data.text_column",
    ),
    "malformed_jsonl": (
        malformed_jsonl_line,
        r"error: .*/bad/train.jsonl line 6: not valid JSON \(.*\); "
        "fix or remove the line",
    ),
    "non_utf8_txt": (
        non_utf8_txt,
        r"error: .*/bad/doc3.txt line 1: not valid UTF-8 \(byte 0xe9 at column 4\); "
        "re-encode the file as UTF-8",
    ),
    "empty_documents": (
        empty_documents,
        r"error: .*/bad\[train\]: all 8 documents are empty in column 'text'; "
        r"check the text column \(data.text_column\)",
    ),
}


def assert_one_error_line(output: str, pattern: str) -> None:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.search(pattern, errors[0]), output


@pytest.mark.parametrize("variant", list(BAD_DATA))
def test_bad_data_is_one_line_before_training_starts(small_data, tmp_path, capsys, variant):
    make, pattern = BAD_DATA[variant]
    source = make(tmp_path / "bad")
    code = main(tiny_args(small_data, tmp_path / "run", f"--data.dataset={source}", "--data.num_streams=2"))
    assert code == 2
    assert_one_error_line(capsys.readouterr().out, pattern)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_seq_len_shorter_than_num_subsets_is_a_config_error(small_data, tmp_path, capsys):
    code = main(tiny_args(small_data, tmp_path, "--training.seq_len=3", "--lrt.num_subsets=4"))
    assert code == 2
    assert_one_error_line(
        capsys.readouterr().out,
        r"config error: training.seq_len=3 is shorter than "
        r"lrt.num_subsets=4: .*raise training.seq_len or lower",
    )


def test_corrupt_tokenizer_file_is_one_line(small_data, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": 3')
    code = main(tiny_args(small_data, tmp_path / "run", f"--model.tokenizer_path={bad}"))
    assert code == 2
    assert_one_error_line(
        capsys.readouterr().out,
        r"tokenizer file '.*tokenizer.json' is not a readable "
        r"tokenizer.json \(.*\); give another file",
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_non_utf8_row_mid_run_names_file_and_row_and_keeps_the_checkpoints(small_data, tmp_path, capsys, workers):
    """The bytes load (a jsonl string), and fail when a loader worker reads the row, several
    checkpoints into the run: the row is named and the checkpoints before it are complete."""
    n = 200
    rows = jsonl_rows(n)
    order = stream_document_order(n, workers, 0, 0, seed=0).tolist()  # stream 0's documents
    # in a later chunk of stream 0 (stream 1 takes every other row): several steps in
    bad_row = order[3 * DOCS_PER_CHUNK // workers]
    rows[bad_row] = b'{"text": "caf\xe9 au lait"}'
    source = write_jsonl(tmp_path / "bad" / "train.jsonl", rows)
    dump = tmp_path / "run"
    code = main(
        tiny_args(
            small_data,
            dump,
            f"--data.dataset={source.parent}",
            f"--data.num_streams={workers}",
            f"--data.num_workers={workers}",
            "--training.steps=1000",
            "--checkpoint.interval=2",
        )
    )
    assert code == 2
    assert_one_error_line(
        capsys.readouterr().out,
        rf"error: .*/bad/train.jsonl line {bad_row + 1}: not valid "
        rf"UTF-8 \(byte 0xe9 at column 14\); .*\(row {bad_row} of ",
    )
    complete = sorted(dump.glob("checkpoints/step-*/complete.json"))
    assert complete, "no checkpoint before the bad row"
    step = json.loads(complete[-1].read_text())["step"]
    assert 2 <= step < 1000


def test_launcher_ends_with_the_trainers_line_and_its_exit_code(small_data, tmp_path):
    """./run_train.sh (torchrun inside): no ChildFailedError report, the message last, exit code 2."""
    source = missing_column(tmp_path / "bad")
    args = tiny_args(small_data, tmp_path / "run", f"--data.dataset={source}", "--data.num_streams=2")
    env = {**os.environ, "PYTHON": sys.executable, "NGPU": "1"}
    out = subprocess.run([str(ROOT / "run_train.sh"), *args], capture_output=True, text=True, timeout=300, env=env)
    output = out.stdout + out.stderr
    assert out.returncode == 2, output
    assert out.stdout.splitlines()[-1] == (
        f"error: text column 'text' not found in {source}[train]; available columns: ['content']; set data.text_column"
    ), output
    assert output.count("not found in") == 1, output  # said once, by the launcher for the trainer
    assert "Traceback" not in output and "ChildFailedError" not in output, output


@pytest.mark.parametrize(
    ("visible", "expected"),
    [(None, 8), ("0,3", 2), ("", 1), ("0,1,2,3,4,5,6,7,8,9", 8), ("GPU-5f3c", 1)],
)
def test_run_train_sh_counts_the_gpus_cuda_visible_devices_leaves(tmp_path, visible, expected):
    """A fake nvidia-smi lists 8 GPUs; CUDA_VISIBLE_DEVICES (when set) narrows them; PYTHON=echo shows
    the command run_train.sh would start."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        '#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: Fake (UUID: GPU-$i)"; done\n'
    )
    (fake / "nvidia-smi").chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_VISIBLE_DEVICES", "NGPU", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
    }
    env.update(PATH=f"{fake}:{env['PATH']}", PYTHON="echo")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    out = subprocess.run(
        [str(ROOT / "run_train.sh"), "--config", "x.toml"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"--torchrun --standalone --nproc_per_node={expected} " in out.stdout, out.stdout


def test_deterministic_sets_the_cublas_workspace_before_cuda_starts(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored (unset) afterwards
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    seen = []

    def init_distributed(*args, **kwargs):
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise RuntimeError("stop here")

    monkeypatch.setattr("titan_lrt.train.init_distributed", init_distributed)
    from titan_lrt.config import load_config

    for deterministic, expected in (("false", None), ("true", CUBLAS_DETERMINISTIC_WORKSPACE)):
        config, _ = load_config(tiny_args(small_data, tmp_path, f"--training.deterministic={deterministic}"))
        with pytest.raises(RuntimeError, match="stop here"):
            Trainer(config)
        assert seen[-1] == expected


def test_launcher_ends_a_crash_with_the_rank_and_the_exception(tmp_path):
    """A crash (not a user error) keeps its traceback; the launcher's last line names rank and exception."""
    script = tmp_path / "crash.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport titan_lrt.train as train\n"
        "def main(argv):\n    raise ZeroDivisionError('the trainer divided by zero')\n"
        "train.main = main\ntrain.run([])\n"
    )
    command = [
        sys.executable,
        str(ROOT / "run_train.sh"),
        "--torchrun",
        "--standalone",
        "--nproc_per_node=1",
        str(script),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == (
        "rank 0 failed: ZeroDivisionError: the trainer divided by zero (traceback above)"
    ), out.stdout + out.stderr
    assert "Traceback" in out.stderr and "ChildFailedError" not in out.stdout + out.stderr
