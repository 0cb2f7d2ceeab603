"""Prepared (pre-tokenized) data and mixtures: tools/prepare_data.py, the shard reader, the loader on them."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_data import assert_same_batches, interleave, rows_of, take

from titan_lrt.data.loader import build_dataloader, merge_loader_states
from titan_lrt.data.prepared import PreparedSplit, shard_files
from titan_lrt.data.streams import StreamState
from titan_lrt.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "dogs",
    "ran",
    "over",
    "hills",
    "and",
    "rivers",
    "def",
    "return",
)


def load_prepare_tool():
    spec = importlib.util.spec_from_file_location("tools_prepare_data", ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = load_prepare_tool()


def texts(n, seed, max_words=90):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


def write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


@pytest.fixture(scope="module")
def jsonl_source(tmp_path_factory):
    """A folder with one jsonl file (no validation split), 300 documents, one of them empty."""
    docs = texts(300, seed=1)
    docs[7] = ""
    return write_jsonl(tmp_path_factory.mktemp("src") / "docs.jsonl", docs).parent, docs


@pytest.fixture(scope="module")
def prepared(jsonl_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "web"
    prep.prepare(
        str(jsonl_source[0]), out, vocab_size=320, shard_tokens=2500, validation_fraction=0.05, show_progress=False
    )
    return out


def loader(source, tokenizer, **kwargs):
    args = {
        "tokenizer": tokenizer,
        "seq_len": 32,
        "local_batch_size": 4,
        "num_streams": 4,
        "split": "train",
        "text_column": "text",
        "packing": "bos_aligned",
        "seed": 0,
        "num_workers": 0,
        "streaming": False,
    }
    return build_dataloader(source, **{**args, **kwargs})


def tok_of(folder):
    return Tokenizer.from_file(Path(folder) / "tokenizer.json")


# ---------------------------------------------------------------- prepare


def test_prepare_writes_every_document_once_tokenized_as_the_tokenizer_does(jsonl_source, prepared):
    _, docs = jsonl_source
    meta = json.loads((prepared / "meta.json").read_text())
    tok = tok_of(prepared)
    assert meta["dtype"] == "uint16" and meta["vocabulary"]["vocab_size"] == tok.vocab_size <= 320
    splits = {s: PreparedSplit(prepared, s) for s in ("train", "validation")}
    assert splits["train"].num_shards > 2 and splits["validation"].num_documents >= 1
    got = {s: [split.document(i).tolist() for i in range(split.num_documents)] for s, split in splits.items()}
    # literal reference: BOS + the tokenizer's ids, documents in source order, the empty one left out
    expected = [[tok.bos_id, *tok.encode(t)] for t in docs if t]
    assert sorted(got["train"] + got["validation"]) == sorted(expected)
    assert docs[0] and got["validation"][0] == expected[0]  # document 0 is always validation
    train_order = [d for d in expected if d not in got["validation"]]
    assert got["train"] == train_order
    counted = sum(len(d) for d in got["train"])
    assert meta["splits"]["train"]["tokens"] == counted
    assert meta["splits"]["train"]["bytes_per_token"] == pytest.approx(
        sum(len(tok.decode(d[1:]).encode()) for d in got["train"]) / (counted - len(got["train"]))
    )


def test_prepare_keeps_a_source_validation_split_and_matches_the_raw_loader(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": texts(120, seed=2)}), src / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": texts(10, seed=3)}), src / "validation-00000-of-00001.parquet")
    out = tmp_path / "out"
    meta = prep.prepare(str(src), out, vocab_size=300, shard_tokens=1000, show_progress=False)
    assert meta["splits"]["validation"]["documents"] == 10 and meta["splits"]["train"]["documents"] == 120
    tok = tok_of(out)
    for split in ("train", "validation"):
        for packing in ("concat", "bos_aligned"):
            assert_same_batches(
                take(loader(out, tok, split=split, packing=packing), 8),
                take(loader(src, tok, split=split, packing=packing), 8),
            )


def test_prepare_streaming_source_with_reused_tokenizer_and_budget(jsonl_source, prepared, tmp_path):
    out = tmp_path / "budget"
    meta = prep.prepare(
        str(jsonl_source[0]),
        out,
        streaming=True,
        tokenizer=prepared / "tokenizer.json",
        max_tokens=3000,
        shard_tokens=1000,
        validation_fraction=0.05,
        show_progress=False,
    )
    train = meta["splits"]["train"]
    assert 3000 <= train["tokens"] < 3000 + 200 and train["shards"] == 3
    full = PreparedSplit(prepared, "train")
    budget = PreparedSplit(out, "train")
    assert [budget.document(i).tolist() for i in range(budget.num_documents)] == [
        full.document(i).tolist() for i in range(budget.num_documents)
    ]
    shards = prep.prepare(
        str(jsonl_source[0]),
        tmp_path / "shards",
        tokenizer=prepared / "tokenizer.json",
        max_shards=2,
        shard_tokens=1000,
        show_progress=False,
    )
    assert shards["splits"]["train"]["shards"] == 2


def test_interrupted_prepare_resumes_to_the_same_files(jsonl_source, prepared, tmp_path, monkeypatch):
    out = tmp_path / "web"
    args = {"vocab_size": 320, "shard_tokens": 2500, "validation_fraction": 0.05, "show_progress": False}
    real_write = prep.write_shard
    calls = []

    def dies_at_the_fourth_shard(folder, split, index, *rest):
        calls.append((split, index))
        if len(calls) == 4:
            tokens_path = shard_files(folder, split, index)[0]
            (tokens_path.parent / f".{tokens_path.name}.tmp-999").write_bytes(b"half a shard")
            raise KeyboardInterrupt  # the process dies mid-write
        return real_write(folder, split, index, *rest)

    monkeypatch.setattr(prep, "write_shard", dies_at_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(jsonl_source[0]), out, **args)
    monkeypatch.setattr(prep, "write_shard", real_write)
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    assert len(kept) == 6  # three finished shards
    with pytest.raises(FileNotFoundError, match=r"unfinished prepare \(3 train, 0 validation shards done\); rerun"):
        loader(out, tok_of(out))
    with pytest.raises(ValueError, match="prepared with other options .*shard_tokens: 2500 then 999"):
        prep.prepare(str(jsonl_source[0]), out, **{**args, "shard_tokens": 999})
    prep.prepare(str(jsonl_source[0]), out, **args)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished shards kept
    assert not list(out.rglob(".*tmp*"))
    files = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file() and p.name != "prepare.json")
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "prepare.json")
    for f in files:
        assert (out / f).read_bytes() == (prepared / f).read_bytes(), f


def test_prepare_tool_reports_bad_input_in_one_line(tmp_path, capsys):
    assert prep.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--vocab-size", "300"]) == 2
    assert prep.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "exactly one of --vocab-size" in err[1]


# ---------------------------------------------------------------- loader on prepared data


@pytest.mark.parametrize("packing", ["concat", "bos_aligned"])
def test_prepared_exact_resume_and_resharding(prepared, packing):
    tok = tok_of(prepared)
    expected = rows_of(take(loader(prepared, tok, packing=packing), 10))
    # kill after 4 steps (state through JSON), resume on one rank: the same rows
    first = loader(prepared, tok, packing=packing, num_workers=1)
    take(first, 4)
    resumed = loader(prepared, tok, packing=packing)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(rows_of(take(resumed, 6)), expected[16:]))

    def ranks(world):
        return [
            loader(prepared, tok, packing=packing, local_batch_size=4 // world, dp_rank=r, dp_world_size=world)
            for r in range(world)
        ]

    two = ranks(2)  # 2 -> 1 -> 2
    rows = interleave([take(rank, 3) for rank in two])
    one = loader(prepared, tok, packing=packing)
    one.load_state_dict(merge_loader_states([rank.state_dict() for rank in two]))
    rows += rows_of(take(one, 3))
    two_again = ranks(2)
    for rank in two_again:
        rank.load_state_dict(one.state_dict())
    rows += interleave([take(rank, 4) for rank in two_again])
    assert len(rows) == len(expected) and all(torch.equal(a, b) for a, b in zip(rows, expected))


def test_batches_and_states_are_the_same_for_every_worker_count(prepared):
    """Workers own disjoint streams; the trainer's process puts their rows back in batch order. Six
    streams, batches of four rows: workers own 6, 3, 2 streams, and a batch's rows reach them unevenly."""
    tok = tok_of(prepared)
    make = lambda workers, **kw: loader(prepared, tok, num_streams=6, num_workers=workers, **kw)  # noqa: E731
    expected = make(0)
    batches, state = take(expected, 7), expected.state_dict()
    for workers in (1, 2, 3):
        run = make(workers)
        assert_same_batches(take(run, 7), batches)
        assert run.state_dict() == state
        run.close()
    # rank 1 of 2 owns streams 1, 3, 5: its rows are every other global row, with 0 or 3 workers
    ranks = [make(3 * r, local_batch_size=2, dp_rank=r, dp_world_size=2) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(interleave([take(r, 7) for r in ranks]), rows_of(batches)))
    ranks[1].close()


def test_resume_across_worker_counts_and_after_close(prepared):
    tok = tok_of(prepared)
    make = lambda workers: loader(prepared, tok, num_streams=6, num_workers=workers)  # noqa: E731
    expected = take(make(0), 12)
    two = make(2)
    head = take(two, 5)
    state = json.loads(json.dumps(two.state_dict()))
    three = make(3)
    three.load_state_dict(state)  # saved with 2 workers, resumed with 3
    assert_same_batches(head + take(three, 7), expected)
    two.close()  # stopped mid-run, iterated again: goes on after the last batch it handed out
    assert_same_batches(take(two, 3), expected[5:8])
    three.load_state_dict(two.state_dict())  # a loader that ran on restarts from the state
    assert_same_batches(take(three, 4), expected[8:])
    for run in (two, three):
        run.close()


def test_prepared_bad_folders_fail_in_one_line(prepared, tmp_path, corpus_tokenizer):
    import shutil

    with pytest.raises(ValueError, match=r"does not match the shards of .*use model.tokenizer_path = .*tokenizer.json"):
        loader(prepared, corpus_tokenizer)
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    shard_files(broken, "train", 1)[0].unlink()
    with pytest.raises(FileNotFoundError, match=r"00001.tokens.npy is missing: the prepared folder .* is incomplete"):
        loader(broken, tok_of(broken))
    shutil.rmtree(broken)
    shutil.copytree(prepared, broken)
    tokens_path = shard_files(broken, "train", 0)[0]
    np.save(tokens_path, np.load(tokens_path)[:-5])  # truncated copy
    with pytest.raises(ValueError, match="does not match its 00000.json .* damaged"):
        take(loader(broken, tok_of(broken)), 20)


@pytest.fixture(scope="module")
def corpus_tokenizer(tmp_path_factory):
    """A tokenizer that is not the prepared folder's (another vocabulary)."""
    from titan_lrt.data.tokenizer import train_tokenizer

    return train_tokenizer(texts(50, seed=9), 290, show_progress=False)


# ---------------------------------------------------------------- mixtures


@pytest.fixture(scope="module")
def code_source(prepared, tmp_path_factory):
    """A raw jsonl source (tokenized on the fly), with the same tokenizer as `prepared`."""
    docs = ["def f(x): return x " * (1 + i % 5) for i in range(200)]
    folder = write_jsonl(tmp_path_factory.mktemp("code") / "train.jsonl", docs).parent
    write_jsonl(folder / "validation.jsonl", ["def g(y): return y"] * 3)
    return folder


def test_mixture_proportions_resume_and_resharding(prepared, code_source):
    tok = tok_of(prepared)
    mixture = {str(prepared): 0.7, str(code_source): 0.3}
    mixed = loader(mixture, tok, seq_len=16)
    draws = mixed.dataset.source
    picks = [draws.pick(0, s, k) for s in range(4) for k in range(2500)]
    # 10000 documents drawn: proportions within 0.02 (over 4 standard deviations)
    assert abs(picks.count(str(prepared)) / len(picks) - 0.7) < 0.02
    # stream 1 yields, in the drawn order, each source's own stream 1, document after document
    stream = draws.open_stream(4, 1, 0, StreamState())
    own = {n: source.open_stream(4, 1, 0, StreamState()) for n, source in draws.sources.items()}
    for k in range(300):
        name = draws.pick(0, 1, k)
        assert torch.equal(stream.current, own[name].current)
        stream.next_document()
        own[name].next_document()
    assert stream.state.source["sources"] == {n: s.state.to_dict() for n, s in own.items()}
    take(mixed, 50)
    counts = mixed.stats()["tokens_read_by_source"]
    assert set(counts) == set(mixture) and sum(counts.values()) == mixed.stats()["tokens_read"] > 0

    expected = rows_of(take(loader(mixture, tok), 10))
    two = [loader(mixture, tok, local_batch_size=2, dp_rank=r, dp_world_size=2, num_workers=r) for r in range(2)]
    rows = interleave([take(rank, 4) for rank in two])
    one = loader(mixture, tok)
    one.load_state_dict(json.loads(json.dumps(merge_loader_states([rank.state_dict() for rank in two]))))
    rows += rows_of(take(one, 6))
    assert all(torch.equal(a, b) for a, b in zip(rows, expected))
    with pytest.raises(ValueError, match="loader state has mixture="):
        loader({str(prepared): 0.5, str(code_source): 0.5}, tok).load_state_dict(one.state_dict())


def test_mixture_bad_weights_and_sources_fail_in_one_line(prepared, tmp_path):
    tok = tok_of(prepared)
    for weight in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="every weight must be a number > 0"):
            loader({str(prepared): weight}, tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader({str(prepared): 0.5, str(tmp_path / "unknown"): 0.5}, tok)


# ---------------------------------------------------------------- the trainer on prepared data


def train_args(dump, *extra):
    return [
        f"--job.dump_folder={dump}",
        "--model.n_layers=1",
        "--model.dim=32",
        "--model.n_heads=2",
        "--lrt.mode=interleaved",
        "--lrt.num_subsets=2",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--training.mixed_precision=float32",
        "--data.num_streams=4",
        "--data.num_workers=0",
        "--metrics.log_freq=1",
        "--lr_scheduler.warmup_steps=1",
        "--lr_scheduler.decay_ratio=0",
        "--eval.interval=0",
        "--eval.steps=1",
        "--eval.exact_sequences=0",
        "--checkpoint.interval=2",
        *extra,
    ]


def train(args, steps):
    from titan_lrt.config import load_config
    from titan_lrt.preemption import StopRequest
    from titan_lrt.train import Trainer

    config, _ = load_config([*args, f"--training.steps={steps}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config)
        trainer.resume()
        trainer.train(StopRequest())
    finally:
        torch.set_num_threads(threads)
    return trainer


def test_prepare_then_train_then_resume_on_prepared_data_and_a_mixture(prepared, code_source, tmp_path):
    from conftest import scalars

    data = [f"--data.dataset={prepared}", f"--model.tokenizer_path={prepared / 'tokenizer.json'}"]
    train(train_args(tmp_path / "whole", *data), 4)
    train(train_args(tmp_path / "cut", *data), 2)
    train(train_args(tmp_path / "cut", *data), 4)  # resumes from step 2
    whole, cut = (scalars(tmp_path / name / "tb", "loss/total") for name in ("whole", "cut"))
    assert [cut[s] for s in (3, 4)] == [whole[s] for s in (3, 4)]

    mixture = json.dumps({str(prepared): 0.6, str(code_source): 0.4})
    mixed = train(train_args(tmp_path / "mix", *data, f"--data.mixture={mixture}", "--eval.interval=2"), 2)
    tb = tmp_path / "mix" / "tb"
    seen = {name: scalars(tb, f"data/tokens/{name}")[2] for name in json.loads(mixture)}
    assert sum(seen.values()) > 0
    for name in ["", *(f"/{n}" for n in json.loads(mixture))]:
        assert scalars(tb, f"val{name}/bpb_merged")[2] > 0
    assert mixed.config.data.mixture == json.loads(mixture)


def test_missing_prepared_data_stops_with_the_prepare_command(tmp_path, capsys):
    from titan_lrt.train import main

    missing = tmp_path / "fineweb"
    code = main(
        train_args(tmp_path / "run", f"--data.dataset={missing}", f"--model.tokenizer_path={missing}/tokenizer.json")
    )
    assert code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "error: data" in out[0]
    assert "does not exist; prepare it with: python tools/prepare_data.py HuggingFaceFW/fineweb-edu" in out[0]
    assert out[0].endswith(f"--vocab-size 8192 --out {missing}")


def test_mixture_config_from_toml_and_command_line_round_trips_and_rejects_bad_weights(tmp_path):
    from titan_lrt.config import ConfigError, load_config

    toml = tmp_path / "mix.toml"
    toml.write_text('[data]\nmixture = { "data/web" = 0.7, "data/code" = 0.3 }\n')
    config, _ = load_config(["--config", str(toml)])
    assert config.data.mixture == {"data/web": 0.7, "data/code": 0.3}
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml())
    assert load_config(["--config", str(again)])[0].data.mixture == config.data.mixture
    assert load_config(['--data.mixture={"a": 1, "b": 2.5}'])[0].data.mixture == {"a": 1.0, "b": 2.5}
    for bad, message in (
        ('{"a": 0}', "every weight must be a number > 0"),
        ('{"a": -1}', "> 0"),
        ('{"a": "x"}', "is not a number"),
        ("[1]", "is not a table"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config([f"--data.mixture={bad}"])


def test_kill_minus_nine_during_prepare_then_rerun_gives_the_uninterrupted_folder(prepared, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    source = write_jsonl(tmp_path / "src" / "docs.jsonl", texts(3000, seed=5)).parent
    args = [
        str(source),
        "--tokenizer",
        str(prepared / "tokenizer.json"),
        "--shard-tokens",
        "500",
        "--validation-fraction",
        "0.05",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), *args]
    assert prep.main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first_shard = shard_files(out, "train", 0)[2]
    while not first_shard.exists() and process.poll() is None:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "meta.json").exists(), "prepare finished before the kill; make the source larger"
    with pytest.raises(FileNotFoundError, match="unfinished prepare"):
        PreparedSplit(out)
    done = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    whole = tmp_path / "whole"
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file() and p.name != "prepare.json")
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "prepare.json")
    assert all((out / f).read_bytes() == (whole / f).read_bytes() for f in files)


def test_prepare_killed_after_the_train_budget_still_finishes_validation(jsonl_source, prepared, tmp_path, monkeypatch):
    args = {
        "tokenizer": prepared / "tokenizer.json",
        "max_tokens": 3000,
        "shard_tokens": 1000,
        "validation_fraction": 0.05,
        "show_progress": False,
    }
    whole = prep.prepare(str(jsonl_source[0]), tmp_path / "whole", **args)
    real_write = prep.write_shard

    def dies_at_the_final_validation_shard(folder, split, index, *rest):
        if split == "validation":
            raise KeyboardInterrupt
        return real_write(folder, split, index, *rest)

    monkeypatch.setattr(prep, "write_shard", dies_at_the_final_validation_shard)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(jsonl_source[0]), tmp_path / "cut", **args)
    monkeypatch.setattr(prep, "write_shard", real_write)
    assert prep.prepare(str(jsonl_source[0]), tmp_path / "cut", **args)["splits"] == whole["splits"]
    for split in ("train", "validation"):
        a, b = PreparedSplit(tmp_path / "whole", split), PreparedSplit(tmp_path / "cut", split)
        assert [a.document(i).tolist() for i in range(a.num_documents)] == [
            b.document(i).tolist() for i in range(b.num_documents)
        ]
