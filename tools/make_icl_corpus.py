"""Write a training corpus of the synthetic in-context tasks (recall, copy, mapping) as jsonl.

    python tools/make_icl_corpus.py --out data/icl --symbols 64 --docs 20000

One document per example, its text decoded from the task tokens (every symbol and
separator is one token of the tokenizer and re-encodes to itself), so the trainer
reads it like any local text data: `--data.dataset=data/icl`. Writes train.jsonl
and validation.jsonl (examples from other seeds). A small symbol set makes the tasks
learnable by tiny models within a few hundred steps: a run that learns them leaves
the unigram plateau, one that does not stays on it (the seed-stability study).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.eval.icl_tasks import TASKS, TaskAlphabet, generate


def write_split(path: Path, tokenizer: Tokenizer, alphabet: TaskAlphabet, docs: int, seed: int) -> None:
    per_task = -(-docs // len(TASKS))
    examples = [e for task in TASKS for e in generate(task, alphabet, per_task, seed=seed)]
    random.Random(seed).shuffle(examples)
    with path.open("w") as f:
        for example in examples[:docs]:
            text = tokenizer.decode([t for t in example.tokens if t != alphabet.bos])
            f.write(json.dumps({"text": text}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tokenizer", default="assets/tokenizer/stdlib_bpe8k.json")
    parser.add_argument("--symbols", type=int, default=64, help="distinct symbols the tasks draw from")
    parser.add_argument("--docs", type=int, default=20000, help="training documents (examples)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    alphabet = TaskAlphabet.from_tokenizer(tokenizer, max_symbols=args.symbols)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_split(out / "train.jsonl", tokenizer, alphabet, args.docs, args.seed)
    write_split(out / "validation.jsonl", tokenizer, alphabet, max(args.docs // 20, 64), args.seed + 1_000_003)
    print(f"wrote {out}/train.jsonl ({args.docs} examples) and validation.jsonl; {len(alphabet.symbols)} symbols")
    return 0


if __name__ == "__main__":
    sys.exit(main())
