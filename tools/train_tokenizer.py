"""Train a byte-level BPE tokenizer (`<|bos|>` = id 0) and save it as tokenizer.json.

    python tools/train_tokenizer.py --data assets/stdlib_corpus --vocab-size 8192 \
        --out assets/tokenizer/tokenizer.json

`--data` is anything `titan_lrt.data.sources.load_documents` opens: a local
directory or file of parquet/jsonl/json/txt, or a hub dataset with --streaming
(then bound the number of documents with --max-docs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from titan_lrt.data.sources import iter_texts, load_documents
from titan_lrt.data.tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="assets/stdlib_corpus", help="default: %(default)s")
    parser.add_argument("--split", default="train", help="default: %(default)s")
    parser.add_argument("--text-column", default="text", help="default: %(default)s")
    parser.add_argument("--streaming", action="store_true", help="stream the data (needed for a hub dataset)")
    parser.add_argument("--hub-config", default=None, help="configuration name of a hub dataset")
    parser.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    parser.add_argument("--vocab-size", type=int, default=8192, help="default: %(default)s")
    parser.add_argument("--out", default="assets/tokenizer/tokenizer.json", help="default: %(default)s")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; remove it to train a new tokenizer")
    documents = load_documents(
        args.data,
        split=args.split,
        text_column=args.text_column,
        streaming=args.streaming,
        hub_config=args.hub_config,
    )
    start = time.perf_counter()
    tokenizer = train_tokenizer(iter_texts(documents, limit=args.max_docs), args.vocab_size)
    seconds = time.perf_counter() - start
    tokenizer.save(out)
    print(
        f"{out}: vocab {tokenizer.vocab_size}, {tokenizer.bos_token} = id {tokenizer.bos_id}, "
        f"trained in {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
