"""Measure tokenizer and data loader throughput on this machine.

    python tools/bench_data.py --data assets/stdlib_corpus --tokenizer assets/tokenizer/tokenizer.json
    python tools/bench_data.py --data data/fineweb_edu_32k --tokenizer data/fineweb_edu_32k/tokenizer.json

Prints tokens/s of `Tokenizer.encode_batch` over the whole split (raw sources),
then of the loader of one rank (tokenize or read shards, pack, batch) for each
packing mode and worker count (`--workers`, default 0 1 2), with the fraction of
tokens packing dropped. Every worker count yields the same batches.
A folder made by tools/prepare_data.py is read pre-tokenized; `--raw SOURCE`
adds the same source tokenized on the fly, to compare both paths.
"""

from __future__ import annotations

import argparse
import time

from titan_lrt.data.loader import build_dataloader
from titan_lrt.data.packing import PACKING_MODES
from titan_lrt.data.prepared import is_prepared
from titan_lrt.data.sources import iter_texts, load_documents
from titan_lrt.data.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="assets/stdlib_corpus", help="default: %(default)s")
    parser.add_argument("--split", default="train", help="default: %(default)s")
    parser.add_argument("--tokenizer", default="assets/tokenizer/tokenizer.json", help="default: %(default)s")
    parser.add_argument("--seq-len", type=int, default=1024, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--batches", type=int, default=200, help="loader batches timed (default: %(default)s)")
    parser.add_argument("--num-streams", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--raw", default=None, help="also time this raw source (tokenized on the fly)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    parser.add_argument("--packing", nargs="+", default=list(PACKING_MODES), choices=PACKING_MODES, help="default: all")
    parser.add_argument(
        "--encode", action=argparse.BooleanOptionalAction, default=True, help="time encode_batch on raw sources"
    )
    args = parser.parse_args(argv)

    tokenizer = Tokenizer.from_file(args.tokenizer)
    for data in (args.data, args.raw) if args.raw else (args.data,):
        if args.encode and not is_prepared(data):
            time_encoding(data, args.split, tokenizer)
        time_loaders(data, tokenizer, args)


def time_encoding(data: str, split: str, tokenizer: Tokenizer) -> None:
    texts = list(iter_texts(load_documents(data, split=split)))
    start = time.perf_counter()
    tokens = sum(len(ids) for i in range(0, len(texts), 64) for ids in tokenizer.encode_batch(texts[i : i + 64]))
    seconds = time.perf_counter() - start
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(
        f"encode_batch: {len(texts)} documents, {tokens} tokens ({num_bytes / tokens:.2f} bytes/token) "
        f"in {seconds:.1f} s: {tokens / seconds:,.0f} tokens/s"
    )


def time_loaders(data: str, tokenizer: Tokenizer, args) -> None:
    kind = "prepared" if is_prepared(data) else "raw"
    for packing in args.packing:
        for num_workers in args.workers:
            loader = build_dataloader(
                data,
                split=args.split,
                tokenizer=tokenizer,
                seq_len=args.seq_len,
                local_batch_size=args.batch_size,
                num_streams=args.num_streams,
                packing=packing,
                num_workers=num_workers,
                text_column="text",
                seed=0,
                streaming=False,
            )
            next(loader)  # start-up (worker fork, first reads) is not timed
            start = time.perf_counter()
            for _ in range(args.batches):
                next(loader)
            seconds = time.perf_counter() - start
            rate = args.batches * args.batch_size * args.seq_len / seconds
            waste = loader.stats()["waste_fraction"]
            loader.close()
            print(
                f"loader {kind:<8} {packing:<11} workers={num_workers}: {rate:,.0f} tokens/s per rank, "
                f"waste {waste:.2%}"
            )


if __name__ == "__main__":
    main()
