"""Write a training corpus of the synthetic in-context tasks (recall, copy, mapping) as jsonl.

    python tools/make_icl_corpus.py --out data/icl --symbols 64 --docs 20000 [--word-tokenizer data/icl_words.json]

One document per example, its text decoded from the task tokens (every symbol and
separator is one token of the tokenizer and re-encodes to itself), so the trainer
reads it like any local text data: `--data.dataset=data/icl`. Writes train.jsonl
and validation.jsonl (examples from other seeds). A small symbol set makes the tasks
learnable by tiny models within a few hundred steps: a run that learns them leaves
the unigram plateau, one that does not stays on it (the seed-stability study).
`--word-tokenizer` also writes a word-level tokenizer.json whose tokens are exactly
the task's symbols and separators (vocabulary: the symbols + 5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_lrt.data.tokenizer import Tokenizer, word_level_tokenizer
from titan_lrt.eval.icl_tasks import TaskAlphabet, write_task_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tokenizer", default="assets/tokenizer/stdlib_bpe8k.json")
    parser.add_argument("--symbols", type=int, default=64, help="distinct symbols the tasks draw from")
    parser.add_argument("--docs", type=int, default=20000, help="training documents (examples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--word-tokenizer", help="also write a word-level tokenizer.json of the symbols here")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    alphabet = TaskAlphabet.from_tokenizer(tokenizer, max_symbols=args.symbols)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_task_corpus(out / "train.jsonl", tokenizer, alphabet, args.docs, args.seed)
    write_task_corpus(out / "validation.jsonl", tokenizer, alphabet, max(args.docs // 20, 64), args.seed + 1_000_003)
    if args.word_tokenizer:
        texts = [tokenizer.decode([i]) for i in (alphabet.pair, alphabet.item, alphabet.line, *alphabet.symbols)]
        words = word_level_tokenizer(texts)
        words.save(args.word_tokenizer)
        print(f"wrote {args.word_tokenizer}: word-level, vocab {words.vocab_size}")
    print(f"wrote {out}/train.jsonl ({args.docs} examples) and validation.jsonl; {len(alphabet.symbols)} symbols")
    return 0


if __name__ == "__main__":
    sys.exit(main())
