"""Prepare a corpus for training: train/validation splits, a tokenizer, pre-tokenized shards.

    python tools/prepare_data.py HuggingFaceFW/fineweb-edu --hub-config sample-10BT --streaming \\
        --vocab-size 32768 --max-tokens 10_000_000_000 --out data/fineweb_edu_32k
    python tools/prepare_data.py my_corpus/ --tokenizer tokenizer.json --out data/my_corpus

SOURCE is a local folder or file of parquet/jsonl/json/txt, or a hub dataset name
with --streaming (needs the network). OUT gets the layout of
`titan_lrt/data/prepared.py`; point `data.dataset` at it and `model.tokenizer_path`
at OUT/tokenizer.json.

- Splits: the source's own validation split when it has one; otherwise document 0
  and every document whose text hash falls under --validation-fraction go to
  validation (deterministic; never trained on).
- Tokenizer: --tokenizer PATH reuses one; --vocab-size V trains a byte-level BPE on
  the first --tokenizer-docs training documents.
- Budget: --max-tokens (train tokens) and/or --max-shards (train shards);
  validation stops at --max-validation-tokens.
- Resumable: rerun the same command after a kill; finished shards are kept and the
  result equals an uninterrupted run. The folder is complete when meta.json exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from titan_lrt.data.prepared import (
    FORMAT,
    META_NAME,
    OPTIONS_NAME,
    SPLITS,
    TOKENIZER_NAME,
    finished_shards,
    is_prepared,
    token_dtype,
    vocabulary_fingerprint,
    write_shard,
)
from titan_lrt.data.sources import Documents, column_text, load_documents
from titan_lrt.data.tokenizer import Tokenizer, train_tokenizer

BATCH_DOCS = 256  # documents encoded per encode_batch call


def prepare(
    source: str,
    out: str | Path,
    *,
    streaming: bool = False,
    hub_config: str | None = None,
    text_column: str = "text",
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_docs: int = 100_000,
    max_tokens: int | None = None,
    max_shards: int | None = None,
    shard_tokens: int = 50_000_000,
    validation_fraction: float = 0.005,
    max_validation_tokens: int = 10_000_000,
    show_progress: bool = True,
) -> dict:
    """Prepare `source` into `out` (or finish an interrupted prepare); returns meta.json's content."""
    out = Path(out)
    if (vocab_size is None) == (tokenizer is None):
        raise ValueError("give exactly one of --vocab-size (train a tokenizer) or --tokenizer PATH (reuse one)")
    if shard_tokens < 1 or not 0 <= validation_fraction < 1:
        raise ValueError("--shard-tokens must be >= 1 and --validation-fraction in [0, 1)")
    options = {
        "source": source,
        "streaming": streaming,
        "hub_config": hub_config,
        "text_column": text_column,
        "vocab_size": vocab_size,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "tokenizer_docs": tokenizer_docs,
        "max_tokens": max_tokens,
        "max_shards": max_shards,
        "shard_tokens": shard_tokens,
        "validation_fraction": validation_fraction,
        "max_validation_tokens": max_validation_tokens,
    }
    _claim_folder(out, options)
    if is_prepared(out):
        return json.loads((out / META_NAME).read_text())
    opened = {"text_column": text_column, "streaming": streaming, "hub_config": hub_config}
    train_docs = load_documents(source, split="train", **opened)
    validation_docs = _own_validation_split(source, opened)
    carve = None if validation_docs is not None else validation_fraction

    tok = _tokenizer(out, tokenizer, vocab_size, train_docs, carve, tokenizer_docs, show_progress)
    dtype = token_dtype(tok.vocab_size)
    writers = {
        "train": _ShardWriter(out, "train", dtype, shard_tokens, max_tokens, max_shards),
        "validation": _ShardWriter(out, "validation", dtype, shard_tokens, max_validation_tokens, None),
    }
    total = (max_tokens or 0) + (max_validation_tokens if max_tokens else 0)
    with tqdm(total=total or None, unit="tok", unit_scale=True, disable=not show_progress, desc=str(out)) as bar:
        bar.update(sum(w.tokens for w in writers.values()))
        if validation_docs is not None:  # each split from its own source
            _tokenize_into(
                validation_docs, tok, lambda i, text: "validation", {"validation": writers["validation"]}, bar
            )
            _tokenize_into(train_docs, tok, lambda i, text: "train", {"train": writers["train"]}, bar)
        else:  # both from the train source; the train split's budget ends the pass
            carved = {"train": writers["train"], "validation": writers["validation"]}
            _tokenize_into(train_docs, tok, lambda i, text: _carved_split(i, text, carve), carved, bar)
        for writer in writers.values():
            writer.flush()
    meta = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocabulary": {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "sha256": vocabulary_fingerprint(tok)},
        "splits": {split: writers[split].summary() for split in SPLITS},
        "options": options,
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=1))
    return meta


def _claim_folder(out: Path, options: dict) -> None:
    """Record the options at the first run; a rerun must use the same ones (it finishes that prepare)."""
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.rglob(".*.tmp-*"):  # a write cut by a kill; its shard is redone
        leftover.unlink()
    path = out / OPTIONS_NAME
    if path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in options.items() if before.get(k) != v}
        if changed:
            described = ", ".join(f"{k}: {a!r} then {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"{out} was prepared with other options ({described}); rerun with the same ones or use another --out"
            )
    elif any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {OPTIONS_NAME}; give an empty or new --out folder")
    else:
        path.write_text(json.dumps(options, indent=1))


def _own_validation_split(source: str, opened: dict) -> Documents | None:
    try:
        return load_documents(source, split="validation", **opened)
    except ValueError as e:  # no such split (local folders say so; hub datasets too)
        if "split" in str(e).lower():
            return None
        raise


def _carved_split(index: int, text: str, fraction: float | None) -> str:
    """Validation for document 0 and a fixed hash-defined fraction of documents, else train."""
    if fraction is None:
        return "train"
    key = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") / 2.0**64
    return "validation" if index == 0 or key < fraction else "train"


def _tokenizer(out, path, vocab_size, train_docs, carve, tokenizer_docs, show_progress) -> Tokenizer:
    target = out / TOKENIZER_NAME
    if not target.exists():
        if path is not None:
            Tokenizer.from_file(path)  # a readable tokenizer with a BOS token
            shutil.copyfile(path, target)
        else:
            texts = (text for i, text in _texts(train_docs, 0) if _carved_split(i, text, carve) == "train")
            limited = (text for _, text in zip(range(tokenizer_docs), texts))
            train_tokenizer(limited, vocab_size, show_progress=show_progress).save(target)
    return Tokenizer.from_file(target)


def _texts(documents: Documents, start: int) -> Iterator[tuple[int, str]]:
    """(source index, text) of the non-empty documents from index `start` on."""
    dataset, column = documents.dataset, documents.text_column
    if documents.streaming:
        for i, example in enumerate(dataset.skip(start) if start else dataset, start):
            text = column_text(example.get(column), documents)
            if text:
                yield i, text
        return
    for first in range(start, len(dataset), BATCH_DOCS):
        for i, value in enumerate(dataset[first : first + BATCH_DOCS][column], first):
            text = column_text(value, documents)
            if text:
                yield i, text


def _tokenize_into(documents: Documents, tok: Tokenizer, split_of, writers: dict, bar) -> None:
    """Encode the documents of one source into the writers their split names, from where the
    unfinished writers stopped, until the first writer is done or the source ends."""
    main = next(iter(writers))
    unfinished = [w.source_end for w in writers.values() if not w.done]
    if not unfinished:
        return
    start = min(unfinished)
    batch: list[tuple[int, str]] = []
    for item in _texts(documents, start):
        batch.append(item)
        if len(batch) == BATCH_DOCS:
            if _write_batch(batch, tok, split_of, writers, main, bar):
                return
            batch = []
    _write_batch(batch, tok, split_of, writers, main, bar)


def _write_batch(batch, tok, split_of, writers, main, bar) -> bool:
    """Add a batch of documents; True once the `main` writer is done."""
    splits = [split_of(i, text) for i, text in batch]
    # skip what finished shards already hold, before paying for the encoding
    todo = [(item, s) for item, s in zip(batch, splits) if not writers[s].done and item[0] >= writers[s].source_end]
    encoded = tok.encode_batch([text for (_, text), _ in todo]) if todo else []
    for ((index, text), split), ids in zip(todo, encoded):
        if writers[main].done and index >= writers[main].source_end:
            return True  # a rerun after the main split finished: the others only catch up to its end
        writer = writers[split]
        if writer.done:
            continue
        before = writer.tokens
        writer.add(np.array([tok.bos_id, *ids], dtype=np.int64), len(text.encode("utf-8")), index + 1)
        bar.update(writer.tokens - before)
        if split == main and writers[main].done:
            return True
    return False


class _ShardWriter:
    """Buffers the documents of one split and writes a shard every `shard_tokens` tokens.

    Its counters start from the finished shards on disk, so a rerun continues the same shards."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int, max_tokens: int | None, max_shards: int | None):
        self.out, self.split, self.dtype = out, split, dtype
        self.shard_tokens, self.max_tokens, self.max_shards = shard_tokens, max_tokens, max_shards
        self.infos = finished_shards(out, split)
        self.buffer: list[np.ndarray] = []
        self.buffer_tokens = self.buffer_bytes = 0
        self.buffer_end = self.source_end

    @property
    def source_end(self) -> int:
        return self.infos[-1]["source_end"] if self.infos else 0

    @property
    def tokens(self) -> int:
        return sum(info["tokens"] for info in self.infos) + self.buffer_tokens

    @property
    def done(self) -> bool:
        full = self.max_tokens is not None and self.tokens >= self.max_tokens
        return full or (self.max_shards is not None and len(self.infos) >= self.max_shards)

    def add(self, tokens: np.ndarray, num_bytes: int, source_end: int) -> None:
        self.buffer.append(tokens)
        self.buffer_tokens += len(tokens)
        self.buffer_bytes += num_bytes
        self.buffer_end = source_end
        if self.buffer_tokens >= self.shard_tokens or self.done:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        info = {
            "split": self.split,
            "index": len(self.infos),
            "bytes": self.buffer_bytes,
            "source_end": self.buffer_end,
        }
        self.infos.append(write_shard(self.out, self.split, len(self.infos), self.buffer, self.dtype, info))
        self.buffer, self.buffer_tokens, self.buffer_bytes = [], 0, 0

    def summary(self) -> dict:
        tokens = sum(i["tokens"] for i in self.infos)
        num_bytes = sum(i["bytes"] for i in self.infos)
        documents = sum(i["documents"] for i in self.infos)
        return {
            "shards": len(self.infos),
            "documents": documents,
            "tokens": tokens,
            "bytes": num_bytes,
            "bytes_per_token": num_bytes / max(tokens - documents, 1),  # BOS tokens carry no text
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="local folder/file of parquet/jsonl/json/txt, or a hub dataset (--streaming)")
    parser.add_argument("--out", required=True, help="the prepared folder to write (or finish)")
    parser.add_argument("--streaming", action="store_true", help="stream the source (needed for a hub dataset)")
    parser.add_argument("--hub-config", default=None, help="configuration of a hub dataset (e.g. sample-10BT)")
    parser.add_argument("--text-column", default="text", help="default: %(default)s")
    parser.add_argument("--vocab-size", type=int, default=None, help="train a byte-level BPE of this size")
    parser.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json")
    parser.add_argument(
        "--tokenizer-docs", type=int, default=100_000, help="documents the BPE trains on (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=_count, default=None, help="train token budget (default: all)")
    parser.add_argument("--max-shards", type=int, default=None, help="train shard budget (default: all)")
    parser.add_argument(
        "--shard-tokens", type=_count, default=50_000_000, help="tokens per shard (default: %(default)s)"
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.005,
        help="carved when the source has no validation split (default: %(default)s)",
    )
    parser.add_argument("--max-validation-tokens", type=_count, default=10_000_000, help="default: %(default)s")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        meta = prepare(
            args.source,
            args.out,
            streaming=args.streaming,
            hub_config=args.hub_config,
            text_column=args.text_column,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            tokenizer_docs=args.tokenizer_docs,
            max_tokens=args.max_tokens,
            max_shards=args.max_shards,
            shard_tokens=args.shard_tokens,
            validation_fraction=args.validation_fraction,
            max_validation_tokens=args.max_validation_tokens,
        )
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vocab = meta["vocabulary"]
    print(f"{args.out}: vocab {vocab['vocab_size']} ({meta['dtype']}), {time.perf_counter() - start:.1f} s")
    for split, s in meta["splits"].items():
        print(
            f"  {split}: {s['shards']} shards, {s['documents']} documents, {s['tokens']:,} tokens, "
            f"{s['bytes_per_token']:.2f} bytes/token"
        )
    return 0


def _count(text: str) -> int:
    return int(text.replace("_", ""))


if __name__ == "__main__":
    sys.exit(main())
