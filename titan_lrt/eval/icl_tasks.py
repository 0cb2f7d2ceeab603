"""Synthetic in-context learning tasks, generated offline and deterministically from a seed.

The tasks are built directly at the token level, from a `TaskAlphabet`: a set
of content tokens ("symbols") and three separator tokens. Built from a
tokenizer, the symbols are tokens that decode to a space and a short
lowercase word and encode back to themselves alone (" cat", " self"), and the
separators are the single tokens of ":", "," and a newline; so the decoded
text of an example reads like text, works with any tokenizer that has such
tokens, and nothing is ever re-tokenized (the answers stay single tokens).
`TaskAlphabet.from_vocab` picks plain ids instead, for a model without a tokenizer.

Tasks (an example is one BOS-started sequence, with the positions of its answers):

- `recall`: associative recall. `k1 : v1 , ... , kn : vn , \\n` then queries
  `k : v ,` for keys drawn from the pairs; the answers are the queried values.
- `copy`: induction. A random span of distinct symbols, a newline, the same
  span again; every token of the copy is an answer.
- `mapping`: few-shot symbol mapping. A random one-to-one map of symbols;
  `shots` demonstrations `a b c : f(a) f(b) f(c) \\n` that together show every
  input symbol, then a new input whose mapped symbols are the answers.

Each answer comes with its candidates (the values, the span, the map's outputs):
chance is one over their number.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

MIN_SYMBOLS = 16
"""The most distinct symbols a task needs with its default sizes."""
_WORD = re.compile(r" [a-z]{2,8}")
_SEPARATORS = {"pair": (":", " :", "="), "item": (",", " ,", ";"), "line": ("\n", " \n", ".")}


class TextTokenizer(Protocol):
    bos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TaskAlphabet:
    """The tokens the tasks are written with."""

    symbols: tuple[int, ...]
    pair: int
    """Between a key and its value, an input and its output."""
    item: int
    """After each pair."""
    line: int
    """Between the demonstrations and the queries, and between examples."""
    bos: int

    @classmethod
    def from_tokenizer(cls, tokenizer: TextTokenizer, max_symbols: int = 512) -> TaskAlphabet:
        """Symbols: the lowest-id tokens that decode to " word" and encode back to themselves."""
        symbols = []
        for i in range(tokenizer.vocab_size):
            text = tokenizer.decode([i])
            if _WORD.fullmatch(text) and tokenizer.encode(text) == [i]:
                symbols.append(i)
                if len(symbols) == max_symbols:
                    break
        separators = {role: _single_token(tokenizer, role, texts) for role, texts in _SEPARATORS.items()}
        return cls(tuple(symbols), bos=tokenizer.bos_id, **separators).checked()

    @classmethod
    def from_vocab(cls, vocab_size: int, bos_id: int, max_symbols: int = 512) -> TaskAlphabet:
        """Plain token ids: the three separators are the first ids after BOS, the symbols the next ones."""
        ids = [i for i in range(vocab_size) if i != bos_id]
        if len(ids) < 3:
            raise ValueError(f"vocab_size={vocab_size} is too small for task separators")
        return cls(tuple(ids[3 : 3 + max_symbols]), pair=ids[0], item=ids[1], line=ids[2], bos=bos_id).checked()

    def checked(self) -> TaskAlphabet:
        if len(self.symbols) < MIN_SYMBOLS:
            raise ValueError(
                f"the task alphabet has {len(self.symbols)} symbols; the tasks need at least {MIN_SYMBOLS} "
                "(a tokenizer with more single-token lowercase words, or a larger vocabulary)"
            )
        return self


@dataclass(frozen=True)
class ICLExample:
    tokens: tuple[int, ...]
    answer_positions: tuple[int, ...]
    """Positions t whose token is an answer, to be predicted from tokens[:t]."""
    candidates: tuple[int, ...]
    """The tokens the answers are chosen from."""


def associative_recall(alphabet: TaskAlphabet, rng: random.Random, pairs: int = 8, queries: int = 4) -> ICLExample:
    _need(alphabet, 2 * pairs, "recall")
    if not 1 <= queries <= pairs:
        raise ValueError(f"recall: queries={queries} must be in 1..pairs={pairs}")
    drawn = rng.sample(alphabet.symbols, 2 * pairs)
    keys, values = drawn[:pairs], drawn[pairs:]
    tokens = [alphabet.bos]
    for k, v in zip(keys, values):
        tokens += [k, alphabet.pair, v, alphabet.item]
    tokens.append(alphabet.line)
    answers = []
    for i in rng.sample(range(pairs), queries):
        tokens += [keys[i], alphabet.pair]
        answers.append(len(tokens))
        tokens += [values[i], alphabet.item]
    return ICLExample(tuple(tokens), tuple(answers), tuple(values))


def induction_copy(alphabet: TaskAlphabet, rng: random.Random, span: int = 16) -> ICLExample:
    _need(alphabet, span, "copy")
    drawn = rng.sample(alphabet.symbols, span)
    tokens = [alphabet.bos, *drawn, alphabet.line, *drawn]
    return ICLExample(tuple(tokens), tuple(range(span + 2, 2 * span + 2)), tuple(drawn))


def symbol_mapping(
    alphabet: TaskAlphabet, rng: random.Random, symbols: int = 6, width: int = 3, shots: int = 6
) -> ICLExample:
    _need(alphabet, 2 * symbols, "mapping")
    if shots * width < symbols:
        raise ValueError(f"mapping: shots x width = {shots} x {width} cannot show all {symbols} symbols")
    drawn = rng.sample(alphabet.symbols, 2 * symbols)
    inputs, outputs = drawn[:symbols], drawn[symbols:]
    mapping = dict(zip(inputs, outputs))
    shown: list[int] = []  # every input symbol at least once, in random order
    while len(shown) < shots * width:
        shown += rng.sample(inputs, symbols)
    tokens = [alphabet.bos]
    for s in range(shots):
        example = shown[s * width : (s + 1) * width]
        tokens += [*example, alphabet.pair, *(mapping[x] for x in example), alphabet.line]
    query = [rng.choice(inputs) for _ in range(width)]
    tokens += [*query, alphabet.pair]
    answers = range(len(tokens), len(tokens) + width)
    tokens += [mapping[x] for x in query]
    return ICLExample(tuple(tokens), tuple(answers), tuple(outputs))


TASKS: dict[str, Callable[[TaskAlphabet, random.Random], ICLExample]] = {
    "recall": associative_recall,
    "copy": induction_copy,
    "mapping": symbol_mapping,
}


def generate(task: str, alphabet: TaskAlphabet, n: int, seed: int = 0) -> list[ICLExample]:
    """n examples of `task`; the same (task, alphabet, n, seed) always gives the same examples."""
    if task not in TASKS:
        raise ValueError(f"ICL task {task!r}: allowed {sorted(TASKS)}")
    rng = random.Random(f"{task}/{seed}")
    return [TASKS[task](alphabet, rng) for _ in range(n)]


def write_task_corpus(
    path: Path,
    tokenizer: TextTokenizer,
    alphabet: TaskAlphabet,
    docs: int,
    seed: int,
    tasks: Sequence[str] = tuple(TASKS),
) -> None:
    """`docs` examples, equally many of each task, shuffled, as a jsonl training file ({"text": ...} per
    example, BOS left to the packer)."""
    per_task = -(-docs // len(tasks))
    examples = [e for task in tasks for e in generate(task, alphabet, per_task, seed=seed)]
    random.Random(seed).shuffle(examples)
    with Path(path).open("w") as f:
        for example in examples[:docs]:
            f.write(json.dumps({"text": tokenizer.decode([t for t in example.tokens if t != alphabet.bos])}) + "\n")


def _need(alphabet: TaskAlphabet, count: int, task: str) -> None:
    if len(alphabet.symbols) < count:
        raise ValueError(f"{task}: needs {count} distinct symbols, the alphabet has {len(alphabet.symbols)}")


def _single_token(tokenizer: TextTokenizer, role: str, texts: tuple[str, ...]) -> int:
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) == 1:
            return ids[0]
    raise ValueError(f"no single-token {role} separator: none of {list(texts)} encodes to one token")
