"""Shared test helpers: a small corpus and tokenizer, tiny trainer arguments, TensorBoard reading."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from titan_lrt.data.corpus import ensure_stdlib_corpus
from titan_lrt.data.tokenizer import ensure_tokenizer


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small slice of the embedded corpus and a 512-token BPE trained on it."""
    folder = tmp_path_factory.mktemp("data")
    corpus = ensure_stdlib_corpus(folder / "corpus", max_files=120, show_progress=False)
    tokenizer = ensure_tokenizer(folder / "tokenizer.json", corpus, 512, show_progress=False)
    return corpus, tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all per-op overhead: one thread is faster, and immune to a busy machine.
    Modules of such tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SLOW = pytest.mark.skipif(
    not os.environ.get("TITAN_LRT_SLOW_TESTS"),
    reason="keeps the default run short (20-30 s each on 2 cores); set TITAN_LRT_SLOW_TESTS=1 to run",
)
"""Tests whose ground another default test already covers, run on demand."""


def tiny_args(small_data, dump: Path, *extra: str) -> list[str]:
    corpus, tokenizer = small_data
    return [
        f"--job.dump_folder={dump}",
        f"--data.dataset={corpus}",
        f"--model.tokenizer_path={tokenizer}",
        "--model.n_layers=2",
        "--model.dim=64",
        "--model.n_heads=2",
        "--lrt.mode=interleaved",
        "--lrt.num_subsets=2",
        "--training.seq_len=64",
        "--training.local_batch_size=4",
        "--training.mixed_precision=float32",
        "--data.num_streams=4",
        "--data.num_workers=0",
        "--optimizer.lr=0.01",
        "--lr_scheduler.warmup_steps=2",
        "--lr_scheduler.decay_ratio=0",
        "--metrics.log_freq=1",
        "--eval.interval=0",
        "--checkpoint.interval=1000",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_run(small_data, tmp_path_factory):
    """One 2-step run of the tiny LRT (validation at step 2, checkpoint at step 2), shared by
    the tests that load, evaluate, export or plot a trained model: (trainer, dump folder)."""
    from titan_lrt.config import load_config
    from titan_lrt.preemption import StopRequest
    from titan_lrt.train import Trainer

    dump = tmp_path_factory.mktemp("trained_run")
    config, _ = load_config(
        tiny_args(
            small_data,
            dump,
            "--training.steps=2",
            "--checkpoint.interval=2",
            "--eval.interval=2",
            "--eval.exact_sequences=1",
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(config)
    trainer.train(StopRequest())
    torch.set_num_threads(threads)
    return trainer, dump


def scalars(tb_folder: Path, tag: str) -> dict[int, float]:
    """Read a scalar series with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}
