"""Tests of titan_lrt.data: corpus, tokenizer, sources, packing, resumable loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch

from titan_lrt.data.corpus import MANIFEST_NAME, ensure_stdlib_corpus, path_hash_fraction
from titan_lrt.data.loader import PackedRowsDataset, build_dataloader, merge_loader_states
from titan_lrt.data.sources import DataError, iter_texts, load_documents
from titan_lrt.data.streams import stream_document_order
from titan_lrt.data.tokenizer import BOS_ID, BOS_TOKEN, Tokenizer, ensure_tokenizer, train_tokenizer

MAX_FILES = 40
LOADER = dict(split="train", text_column="text", packing="bos_aligned", seed=0, num_workers=0, streaming=False)
"""build_dataloader's config-owned arguments (it has no defaults for them) as these tests use them."""


def loader_of(source, **kwargs):
    return build_dataloader(source, **{**LOADER, **kwargs})


class CharTokenizer:
    """Test double: one token per character (its code point), BOS = 0."""

    bos_id = 0

    def encode_batch(self, texts):
        return [[ord(c) for c in text] for text in texts]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    return ensure_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "stdlib", max_files=MAX_FILES, show_progress=False)


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    return train_tokenizer(iter_texts(load_documents(corpus_dir, split="train")), 512, show_progress=False)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def rows_of(batches):
    """Rows (seq_len + 1 tokens) rebuilt from (inputs, targets) batches."""
    return [torch.cat([x[i], y[i, -1:]]) for x, y in batches for i in range(len(x))]


def interleave(per_rank_batches):
    """Global row order of W ranks' batches: step by step, row i of rank r is global row i*W + r."""
    rows = []
    for step in zip(*per_rank_batches):
        local = [rows_of([b]) for b in step]
        for i in range(len(local[0])):
            rows.extend(rank_rows[i] for rank_rows in local)
    return rows


def unique_char_docs(lengths):
    """Documents whose characters are all distinct, so each token names its document and position."""
    docs, next_code = [], 0x4E00
    for n in lengths:
        docs.append("".join(chr(next_code + i) for i in range(n)))
        next_code += n
    return docs


# ---------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_build_is_idempotent(tmp_path, corpus_dir):
    other = ensure_stdlib_corpus(tmp_path / "again", max_files=MAX_FILES, show_progress=False)
    manifest = json.loads((corpus_dir / MANIFEST_NAME).read_text())
    assert manifest == json.loads((other / MANIFEST_NAME).read_text())
    train, validation = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert train["files"] + validation["files"] == MAX_FILES and validation["files"] >= 1
    assert manifest["python_version"].count(".") == 2 and len(manifest["sha256"]) == 64

    for split in (train, validation):
        for shard in split["shards"]:
            assert pq.read_table(corpus_dir / shard).equals(pq.read_table(other / shard))
    train_table = pa.concat_tables([pq.read_table(corpus_dir / s) for s in train["shards"]])
    val_table = pq.read_table(corpus_dir / validation["shards"][0])
    train_paths, val_paths = train_table["path"].to_pylist(), val_table["path"].to_pylist()
    assert train_paths == sorted(train_paths) and not set(train_paths) & set(val_paths)
    assert all(path_hash_fraction(p) >= 0.02 for p in train_paths)
    assert all(path_hash_fraction(p) < 0.02 for p in val_paths) or len(val_paths) == 1
    assert sum(len(t.encode()) for t in train_table["text"].to_pylist()) == train["bytes"]

    stamp = (other / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_stdlib_corpus(other, max_files=MAX_FILES, show_progress=False) == other
    assert (other / MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_corpus_refuses_other_options_and_foreign_directories(tmp_path, corpus_dir):
    with pytest.raises(ValueError, match="max_files=40"):
        ensure_stdlib_corpus(corpus_dir, max_files=MAX_FILES + 1, show_progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no complete corpus build"):
        ensure_stdlib_corpus(tmp_path / "junk", max_files=4, show_progress=False)
    with pytest.raises(ValueError, match="max_files must be None or an integer >= 2, got 1"):
        ensure_stdlib_corpus(tmp_path / "one", max_files=1)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_bos_and_token_bytes(tokenizer, corpus_dir):
    texts = list(iter_texts(load_documents(corpus_dir, split="validation")))
    texts += ["héllo wörld — ünïcode ✓ 你好 🐍\n\tdef f(x):\n        return x ** 2\n", " ", "\x00\r\n"]
    assert tokenizer.bos_id == BOS_ID == 0 and tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.vocab_size == 512
    token_bytes = tokenizer.token_bytes()
    assert token_bytes.dtype == torch.long and token_bytes.shape == (512,)
    assert token_bytes[BOS_ID] == 0 and token_bytes[1:].min() >= 1
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert ids == tokenizer.encode(text) and BOS_ID not in ids
        assert tokenizer.decode(ids) == text
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_tokenizer_file_and_foreign_bos(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json")
    assert loaded.encode("print('hi')") == tokenizer.encode("print('hi')") and loaded.bos_id == 0

    def foreign(specials):
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
        tok.add_special_tokens(specials)
        path = tmp_path / f"foreign{len(specials)}.json"
        tok.save(str(path))
        return path

    assert Tokenizer.from_file(foreign(["<pad>", "<|endoftext|>"])).bos_id == 3
    assert Tokenizer.from_file(foreign(["<pad>", "<|endoftext|>", "<s>"]), bos_token="<s>").bos_id == 4
    with pytest.raises(ValueError, match="none of .*<\\|bos\\|>.*bos_token="):
        Tokenizer.from_file(foreign(["<pad>"]))
    with pytest.raises(ValueError, match="bos_token '<start>' is not in the vocabulary"):
        Tokenizer.from_file(foreign(["<pad>"]), bos_token="<start>")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")


def test_ensure_tokenizer_trains_once(tmp_path, corpus_dir):
    path = ensure_tokenizer(tmp_path / "tokenizer.json", corpus_dir, 300, show_progress=False)
    assert Tokenizer.from_file(path).vocab_size == 300
    stamp = path.stat().st_mtime_ns
    assert ensure_tokenizer(path, corpus_dir, 300, show_progress=False) == path
    assert path.stat().st_mtime_ns == stamp and [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 258.*got 100"):
        train_tokenizer(["abc"], 100)


# ---------------------------------------------------------------- sources


def test_jsonl_json_and_txt_sources(tmp_path, tokenizer):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": f"doc {i} " * (i + 1)}) + "\n" for i in range(6)))
    docs = load_documents(tmp_path / "docs.jsonl", text_column="body")
    assert list(iter_texts(docs))[:2] == ["doc 0 ", "doc 1 doc 1 "]
    (tmp_path / "docs.json").write_text(json.dumps([{"text": "a b"}, {"text": "c"}]))
    assert list(iter_texts(load_documents(tmp_path / "docs.json"))) == ["a b", "c"]

    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "one.txt").write_text("first para\nline two\n\nsecond para\n")
    (txt / "two.txt").write_text("another file\n")
    assert len(list(iter_texts(load_documents(txt)))) == 2
    assert len(list(iter_texts(load_documents(txt, txt_sample_by="paragraph")))) == 3
    assert len(list(iter_texts(load_documents(txt, txt_sample_by="line")))) == 4

    loader = loader_of(
        tmp_path / "docs.jsonl", text_column="body", tokenizer=tokenizer, seq_len=8, local_batch_size=2, num_streams=2
    )
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (2, 8) and inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_directory_splits_by_file_name(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "t"}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "v"}) + "\n")
    (tmp_path / "manifest.json").write_text("{}")
    assert list(iter_texts(load_documents(tmp_path, split="validation"))) == ["v"]
    assert list(iter_texts(load_documents(tmp_path, split="train"))) == ["t"]
    with pytest.raises(ValueError, match="split 'test' not found.*available splits: \\['train', 'validation'\\]"):
        load_documents(tmp_path, split="test")


def test_bad_sources_and_settings_give_clear_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="'.*missing_dir' does not exist.*streaming=True"):
        load_documents(tmp_path / "missing_dir")
    with pytest.raises(FileNotFoundError, match="does not exist.*streaming=True"):
        load_documents("some-user/some-dataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        load_documents(tmp_path / "empty")
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="unsupported data file .*data.csv"):
        load_documents(tmp_path / "data.csv")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": str(i)}) + "\n" for i in range(4)))
    with pytest.raises(KeyError, match="text column 'text' not found.*\\['body'\\]"):
        load_documents(tmp_path / "d.jsonl")
    numbers = load_documents(datasets.Dataset.from_dict({"n": [1, 2]}), text_column="n")
    with pytest.raises(TypeError, match="column 'n' of .* holds int, expected str"):
        list(iter_texts(numbers))
    with pytest.raises(ValueError, match="txt_sample_by must be one of"):
        load_documents(tmp_path / "d.jsonl", txt_sample_by="page")

    def loader(**kwargs):
        args = dict(text_column="body", tokenizer=tokenizer, seq_len=8, local_batch_size=2, num_streams=2)
        return loader_of(tmp_path / "d.jsonl", **{**args, **kwargs})

    with pytest.raises(ValueError, match="packing must be one of \\('concat', 'bos_aligned'\\), got 'best'"):
        loader(packing="best")
    with pytest.raises(ValueError, match="num_streams \\(2\\) must be a multiple of dp_world_size \\(4\\)"):
        loader(dp_world_size=4, dp_rank=1)
    with pytest.raises(ValueError, match="dp_rank must be an integer in \\[0, 2\\), got 2"):
        loader(dp_world_size=2, dp_rank=2)
    with pytest.raises(ValueError, match="4 documents, fewer than num_streams=8"):
        loader(num_streams=8)
    with pytest.raises(ValueError, match="num_workers must be an integer in \\[0, 16\\], got 17"):
        loader(num_workers=17)
    with pytest.raises(ValueError, match="data.num_workers=2 is more than the 1 streams this rank packs .*over 2 data"):
        loader(num_workers=2, dp_world_size=2, dp_rank=1)
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        loader(seq_len=0)


# ---------------------------------------------------------------- packing


def stream_rows(rows, stream, num_streams):
    return rows[stream::num_streams]


def test_concat_packing_loses_and_repeats_nothing_across_epochs():
    texts = [f"document number {i} " + "xy" * (i % 7) for i in range(10)] + [""]
    ds = datasets.Dataset.from_dict({"text": texts})
    num_streams, seq_len, seed = 3, 5, 7
    loader = loader_of(
        ds,
        tokenizer=CharTokenizer(),
        seq_len=seq_len,
        local_batch_size=3,
        num_streams=num_streams,
        packing="concat",
        seed=seed,
    )
    rows = rows_of(take(loader, 40))  # about 5 epochs of each stream
    for s in range(num_streams):
        mine = stream_rows(rows, s, num_streams)
        assert all(torch.equal(a[-1:], b[:1]) for a, b in zip(mine, mine[1:]))  # one-token overlap
        got = torch.cat([mine[0]] + [r[1:] for r in mine[1:]]).tolist()
        expected = []
        for epoch in range(10):
            for i in stream_document_order(len(texts), num_streams, s, epoch, seed).tolist():
                if texts[i]:
                    expected += [0] + [ord(c) for c in texts[i]]
        assert got == expected[: len(got)]
    assert loader.stats()["tokens_dropped"] == 0 and loader.stats()["tokens_read"] > 0


def test_bos_aligned_packing_exact_rows_and_waste():
    # In stream order, lengths with BOS: 4, 3, 5, 12 (long), 2, 6, 9 (long), 3, 4
    designed = ["aaa", "bb", "cccc", "d" * 11, "e", "fffff", "g" * 8, "hh", "iii"]
    order = stream_document_order(len(designed), 1, 0, 0, 0).tolist()
    texts = [None] * len(designed)
    for position, index in enumerate(order):
        texts[index] = designed[position]
    ds = datasets.Dataset.from_dict({"text": texts})
    loader = loader_of(ds, tokenizer=CharTokenizer(), seq_len=7, local_batch_size=1, num_streams=1)
    rows = ["".join("^" if t == 0 else chr(t) for t in row.tolist()) for row in rows_of(take(loader, 5))]
    assert rows == [
        "^aaa^bb^",  # "cccc" fits a row but not the rest of this one: cropped to its BOS, 4 dropped
        "^ddddddd",  # a document longer than a row ...
        "ddddd^e^",  # ... continues mid-document (one-token overlap); "fffff" cropped, 5 dropped
        "^ggggggg",  # long again: one row ...
        "gg^hh^ii",  # ... plus a continuation; "iii" cropped, 1 dropped
    ]
    stats = loader.stats()
    assert stats["tokens_dropped"] == 4 + 5 + 1
    assert stats["tokens_read"] == 4 + 3 + 5 + 12 + 2 + 6 + 9 + 3 + 4
    assert stats["waste_fraction"] == pytest.approx(10 / 48)


@pytest.mark.parametrize("packing", ["concat", "bos_aligned"])
def test_rows_start_where_the_strategy_says(packing):
    lengths = [(i * 37) % 23 + 1 for i in range(60)]
    docs = unique_char_docs(lengths)
    ds = datasets.Dataset.from_dict({"text": docs})
    num_streams, seq_len = 4, 9
    where = {ord(c): (d, p + 1) for d, doc in enumerate(docs) for p, c in enumerate(doc)}  # token -> (doc, pos)
    loader = loader_of(
        ds, tokenizer=CharTokenizer(), seq_len=seq_len, local_batch_size=4, num_streams=num_streams, packing=packing
    )
    rows = rows_of(take(loader, 8))  # 8 rows per stream: stays in epoch 0
    dropped = 0
    for s in range(num_streams):
        mine = [r.tolist() for r in stream_rows(rows, s, num_streams)]
        rank_of = {d: i for i, d in enumerate(stream_document_order(len(docs), num_streams, s, 0, 0).tolist())}
        seen = {}  # doc -> character positions placed in rows
        for k, row in enumerate(mine):
            if packing == "concat" and k > 0:
                assert row[0] == mine[k - 1][-1]  # one-token overlap
            if packing == "bos_aligned" and row[0] != 0:
                assert k > 0 and row[0] == mine[k - 1][-1]  # continuation of a long document
                assert lengths[where[row[0]][0]] + 1 > seq_len + 1
            for a, b in zip(row, row[1:]):
                if b != 0:  # inside a document: consecutive positions
                    assert where[b][1] == (1 if a == 0 else where[a][1] + 1)
                    if a != 0:
                        assert where[a][0] == where[b][0]
                    seen.setdefault(where[b][0], set()).add(where[b][1])
        tokens = [rank_of[where[t][0]] for row in mine for t in row if t]
        assert tokens == sorted(tokens)  # documents in stream order
        last = max(rank_of[d] for d in seen)  # may still be in progress
        for d in (d for d, i in rank_of.items() if i < last):  # documents passed
            placed = len(seen.get(d, ()))  # 0: cropped to its BOS
            assert seen.get(d, set()) == set(range(1, placed + 1))  # a prefix
            if packing == "concat":
                assert placed == lengths[d]
            elif placed < lengths[d]:
                assert lengths[d] + 1 <= seq_len + 1  # only documents that fit a row are cropped
            dropped += lengths[d] - placed
    stats = loader.stats()
    if packing == "concat":
        assert dropped == stats["tokens_dropped"] == 0
    else:
        assert 0 < dropped <= stats["tokens_dropped"] <= dropped + num_streams * max(lengths)


# ---------------------------------------------------------------- resume and world size


def corpus_loader(corpus_dir, tokenizer, **kwargs):
    args = dict(tokenizer=tokenizer, seq_len=32, local_batch_size=3, num_streams=4)
    return loader_of(corpus_dir, **{**args, **kwargs})


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("packing", ["concat", "bos_aligned"])
def test_exact_resume(corpus_dir, tokenizer, packing, num_workers):
    expected = take(corpus_loader(corpus_dir, tokenizer, packing=packing, num_workers=num_workers), 12)
    first = corpus_loader(corpus_dir, tokenizer, packing=packing, num_workers=num_workers)
    head = take(first, 5)
    state = first.state_dict()
    assert set(state["streams"]) == {"0", "1", "2", "3"} and state["packing"] == packing
    second = corpus_loader(corpus_dir, tokenizer, packing=packing, num_workers=num_workers)
    second.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert_same_batches(head + take(second, 7), expected)
    take(first, 1)
    first.load_state_dict(state)  # a loader that ran on restarts from the state
    assert_same_batches(take(first, 7), expected[5:])


def test_resume_across_epochs_with_worker_state_loaded_without_worker():
    ds = datasets.Dataset.from_dict({"text": [f"short doc {i}" * (1 + i % 3) for i in range(6)]})
    make = lambda workers: loader_of(  # noqa: E731
        ds, tokenizer=CharTokenizer(), seq_len=16, local_batch_size=2, num_streams=2, num_workers=workers
    )
    expected = take(make(0), 30)
    first = make(1)
    take(first, 17)
    state = first.state_dict()
    assert min(s["epoch"] for s in state["streams"].values()) >= 2
    second = make(0)
    second.load_state_dict(state)
    assert_same_batches(take(second, 13), expected[17:])


@pytest.mark.parametrize("packing", ["concat", "bos_aligned"])
def test_global_row_sequence_is_independent_of_world_size(corpus_dir, tokenizer, packing):
    single = rows_of(take(corpus_loader(corpus_dir, tokenizer, packing=packing, local_batch_size=4), 6))
    for world in (2, 4):
        ranks = [
            corpus_loader(
                corpus_dir, tokenizer, packing=packing, local_batch_size=4 // world, dp_rank=r, dp_world_size=world
            )
            for r in range(world)
        ]
        assert all(torch.equal(a, b) for a, b in zip(interleave([take(rank, 6) for rank in ranks]), single))


@pytest.mark.parametrize("packing", ["concat", "bos_aligned"])
def test_state_reshards_between_world_sizes(corpus_dir, tokenizer, packing):
    single = corpus_loader(corpus_dir, tokenizer, packing=packing, local_batch_size=4)
    expected = rows_of(take(single, 10))

    def ranks(world, **kwargs):
        return [
            corpus_loader(
                corpus_dir,
                tokenizer,
                packing=packing,
                local_batch_size=4 // world,
                dp_rank=r,
                dp_world_size=world,
                **kwargs,
            )
            for r in range(world)
        ]

    # 2 -> 1: two ranks run 4 steps; their merged state resumes on one rank
    two = ranks(2, num_workers=1)
    head = interleave([take(rank, 4) for rank in two])
    per_rank = [rank.state_dict() for rank in two]
    assert set(per_rank[0]["streams"]) == {"0", "2"} and set(per_rank[1]["streams"]) == {"1", "3"}
    one = corpus_loader(corpus_dir, tokenizer, packing=packing, local_batch_size=4)
    with pytest.raises(ValueError, match="lacks streams \\[1, 3\\]"):
        one.load_state_dict(per_rank[0])
    one.load_state_dict(merge_loader_states(per_rank))
    rows = head + rows_of(take(one, 3))
    # 1 -> 2: the single rank's state resumes on two ranks
    state = one.state_dict()
    two_again = ranks(2)
    for rank in two_again:
        rank.load_state_dict(state)
    rows += interleave([take(rank, 3) for rank in two_again])
    assert len(rows) == len(expected) and all(torch.equal(a, b) for a, b in zip(rows, expected))


def test_resume_with_another_global_batch_continues_at_the_same_row(corpus_dir, tokenizer):
    expected = rows_of(take(corpus_loader(corpus_dir, tokenizer, local_batch_size=1), 7))
    one = corpus_loader(corpus_dir, tokenizer, local_batch_size=3)
    rows = rows_of(take(one, 1))  # global rows 0..2: the next global row, 3, is odd
    two = [corpus_loader(corpus_dir, tokenizer, local_batch_size=2, dp_rank=r, dp_world_size=2) for r in range(2)]
    for rank in two:
        rank.load_state_dict(one.state_dict())
    even, odd = (rows_of(take(rank, 1)) for rank in two)
    rows += [odd[0], even[0], odd[1], even[1]]  # global rows 3, 4, 5, 6
    assert all(torch.equal(a, b) for a, b in zip(rows, expected))


def test_state_validation_and_merge_errors(corpus_dir, tokenizer):
    loader = corpus_loader(corpus_dir, tokenizer)
    take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="loader state has seq_len=32 but this loader has seq_len=16"):
        corpus_loader(corpus_dir, tokenizer, seq_len=16).load_state_dict(state)
    skewed = json.loads(json.dumps(state))
    skewed["streams"]["0"]["rows"] += 4
    with pytest.raises(ValueError, match="not at a global row boundary"):
        corpus_loader(corpus_dir, tokenizer).load_state_dict(skewed)
    with pytest.raises(ValueError, match="disagree on stream 0"):
        merge_loader_states([state, skewed])
    with pytest.raises(ValueError, match="cannot merge loader states with packing"):
        merge_loader_states([state, {**state, "packing": "concat"}])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streaming_source_resumes_and_matches_across_world_sizes(tmp_path, num_workers):
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps({"text": f"streamed document {i} " * (1 + i % 4)}) + "\n" for i in range(9)))

    def make(world=1, rank=0, workers=0):
        return loader_of(
            path,
            streaming=True,
            tokenizer=CharTokenizer(),
            seq_len=12,
            local_batch_size=4 // world,
            num_streams=2,
            dp_rank=rank,
            dp_world_size=world,
            packing="concat",
            num_workers=workers,
        )

    expected = take(make(), 20)
    with pytest.raises(ValueError, match="num_workers=2 with streamed data: .* at most 1 worker; set data.num_w"):
        make(workers=2)  # datasets would hand each torch worker part of a stream
    first = make(workers=num_workers)
    take(first, 8)
    state = first.state_dict()
    assert {s["epoch"] for s in state["streams"].values()} != {0}
    assert all((s["source"] is None) == (s["doc"] == 0) for s in state["streams"].values())
    second = make()
    second.load_state_dict(state)
    assert_same_batches(take(second, 12), expected[8:])
    two = [make(2, r) for r in range(2)]
    for rank in two:
        rank.load_state_dict(state)
    rows = interleave([take(rank, 12) for rank in two])
    assert all(torch.equal(a, b) for a, b in zip(rows, rows_of(expected[8:])))


def test_packed_rows_dataset_rejects_empty_streams():
    ds = datasets.Dataset.from_dict({"text": ["a", "", "b", ""]})
    dataset = PackedRowsDataset(
        load_documents(ds), CharTokenizer(), seq_len=4, local_batch_size=2, num_streams=2, packing="concat", seed=0
    )
    with pytest.raises(ValueError, match="stream 1 of 2 has no non-empty document"):
        next(iter(dataset))


def test_data_package_imports_no_trainer_side_module():
    import ast
    import pathlib

    import titan_lrt.data

    forbidden = ("titan_lrt.model", "titan_lrt.parallel", "titan_lrt.train", "titan_lrt.checkpoint", "titan_lrt.config")
    for path in pathlib.Path(titan_lrt.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not [n for n in names if n.startswith(forbidden)], (path.name, names)


def test_bad_jsonl_lines_are_named_by_file_and_line(tmp_path):
    good = [json.dumps({"text": f"document {i}"}).encode() for i in range(6)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_bytes(b"\n".join([*good[:3], b'{"text": 3,', *good[3:]]) + b"\n")
    with pytest.raises(DataError, match=r"a/train.jsonl line 4: not valid JSON \(.*\); fix or remove the line"):
        load_documents(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.jsonl").write_bytes(b"\n".join([*good, b"[1, 2]"]) + b"\n")
    with pytest.raises(DataError, match=r"b/train.jsonl line 7: a JSON list, expected one object per line"):
        load_documents(tmp_path / "b")


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_non_utf8_bytes_in_a_jsonl_string_fail_at_their_row_with_file_and_line(tmp_path, num_workers):
    """They load (Arrow keeps the bytes) and fail when the loader reads the row, in a worker
    too: the error arrives as the DataError itself, not wrapped in the worker's traceback."""
    rows = [json.dumps({"text": f"document {i} " * 4}).encode() for i in range(10)]
    rows[7] = b'{"text": "caf\xe9"}'
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    loader = loader_of(
        path,
        tokenizer=CharTokenizer(),
        seq_len=8,
        local_batch_size=2,
        num_streams=max(num_workers, 1),
        num_workers=num_workers,
    )
    with pytest.raises(
        DataError,
        match=r"train.jsonl line 8: not valid UTF-8 \(byte 0xe9 at column 14\); "
        r"re-encode .* \(row 7 of .*train.jsonl\[train\]\)",
    ):
        take(loader, 100)


EXIT_SCRIPT = """
import json, sys
from titan_lrt.data.loader import build_dataloader

class CharTokenizer:
    bos_id = 0

    def encode_batch(self, texts):
        return [[ord(c) for c in text] for text in texts]

def loader_of(path):
    return build_dataloader(
        path, tokenizer=CharTokenizer(), seq_len=8, local_batch_size=3, num_streams=4, num_workers=2,
        split="train", text_column="text", packing="concat", seed=0, streaming=False,
    )

good, bad = sys.argv[1:]
kept = loader_of(good)  # still running, and referenced, when the interpreter exits
for _ in range(3):
    next(kept)
failing = loader_of(bad)
while True:
    next(failing)
"""


def test_process_exits_with_the_data_error_while_loaders_with_workers_are_open(tmp_path):
    """Workers ignore stop signals, so the interpreter's exit must stop them (it used to wait forever)."""
    good = tmp_path / "good" / "train.jsonl"
    good.parent.mkdir()
    good.write_text("".join(json.dumps({"text": f"document {i} " * 3}) + "\n" for i in range(12)))
    rows = [json.dumps({"text": f"document {i} " * 3}).encode() for i in range(12)]
    rows[9] = b'{"text": "caf\xe9"}'
    bad = tmp_path / "bad" / "train.jsonl"
    bad.parent.mkdir()
    bad.write_bytes(b"\n".join(rows) + b"\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(good), str(bad)], capture_output=True, text=True, env=env, timeout=120
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("titan_lrt.data.sources.DataError: "), done.stderr[-2000:]
    assert "train.jsonl line 10: not valid UTF-8" in last


def test_too_few_non_empty_documents_for_the_streams_is_named_up_front():
    ds = datasets.Dataset.from_dict({"text": ["a", "", None, "b", "", ""]})
    with pytest.raises(DataError, match=r"has 2 non-empty documents \(of 6\), fewer than num_streams=4; lower"):
        PackedRowsDataset(
            load_documents(ds),
            CharTokenizer(),
            seq_len=4,
            local_batch_size=2,
            num_streams=4,
            packing="bos_aligned",
            seed=0,
        )
    empty = datasets.Dataset.from_dict({"text": ["", None]})
    with pytest.raises(DataError, match=r"all 2 documents are empty in column 'text'"):
        PackedRowsDataset(
            load_documents(empty),
            CharTokenizer(),
            seq_len=4,
            local_batch_size=2,
            num_streams=1,
            packing="concat",
            seed=0,
        )
