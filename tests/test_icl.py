"""Synthetic in-context learning tasks: deterministic generators, and a scorer that gives an oracle
100% and a guesser chance."""

import json

import pytest
import torch
from lrt_reference import sequential_recurrence, tiny_args, tiny_model

from titan_lrt.data.tokenizer import BOS_ID, Tokenizer, word_level_tokenizer
from titan_lrt.eval.icl import evaluate_icl, pad_right, score_examples
from titan_lrt.eval.icl_tasks import TASKS, TaskAlphabet, generate, write_task_corpus
from titan_lrt.eval.logits import model_predictor, sequence_logits
from titan_lrt.model.schedule import baseline

ALPHABET = TaskAlphabet.from_vocab(vocab_size=61, bos_id=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(tokens):
    """Predicts the true next token everywhere (it reads ahead)."""
    logits = torch.zeros(*tokens.shape, 61)
    logits[:, :-1].scatter_(2, tokens[:, 1:, None], 10.0)
    return logits


def guesser(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda tokens: torch.randn(*tokens.shape, 61, generator=g)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_are_deterministic_for_a_seed(task):
    first, again, other = (generate(task, ALPHABET, 20, seed) for seed in (3, 3, 4))
    assert first == again
    assert first != other
    for example in first:
        assert example.tokens[0] == ALPHABET.bos
        assert set(example.tokens) <= {*ALPHABET.symbols, ALPHABET.pair, ALPHABET.item, ALPHABET.line, ALPHABET.bos}
        assert all(example.tokens[p] in example.candidates for p in example.answer_positions)


def test_each_answer_is_determined_by_the_context():
    for ex in generate("recall", ALPHABET, 20):
        pairs = {ex.tokens[i]: ex.tokens[i + 2] for i in range(1, ex.tokens.index(ALPHABET.line), 4)}
        assert len(pairs) == 8
        for p in ex.answer_positions:
            assert ex.tokens[p - 1] == ALPHABET.pair and ex.tokens[p] == pairs[ex.tokens[p - 2]]
    for ex in generate("copy", ALPHABET, 20):
        span = ex.tokens[1 : ex.tokens.index(ALPHABET.line)]
        assert len(set(span)) == len(span) == 16
        assert [ex.tokens[p] for p in ex.answer_positions] == list(span)
    for ex in generate("mapping", ALPHABET, 20):
        lines = _split(ex.tokens[1:], ALPHABET.line)
        shown = {}
        for line in lines[:-1]:
            inputs, outputs = _split(line, ALPHABET.pair)
            shown.update(zip(inputs, outputs))
        assert len(shown) == 6 and len(set(shown.values())) == 6  # every input shown, one-to-one
        query, answer = _split(lines[-1], ALPHABET.pair)
        assert [shown[x] for x in query] == answer == [ex.tokens[p] for p in ex.answer_positions]


def _split(tokens, separator):
    parts, current = [], []
    for t in tokens:
        if t == separator:
            parts.append(current)
            current = []
        else:
            current.append(t)
    return parts + [current] if current else parts


@pytest.mark.parametrize("task", sorted(TASKS))
def test_oracle_scores_100_percent_and_a_guesser_about_chance(task):
    examples = generate(task, ALPHABET, 200)
    perfect = score_examples(oracle, examples, ALPHABET.bos)
    assert perfect.accuracy == perfect.choice_accuracy == 1.0
    guessed = score_examples(guesser(0), examples, ALPHABET.bos)
    assert guessed.answers == perfect.answers >= 600
    assert guessed.choice_accuracy == pytest.approx(guessed.chance, abs=0.04)
    assert guessed.accuracy < 0.05  # the whole vocabulary: about 1 / 61
    assert guessed.chance == pytest.approx({"recall": 1 / 8, "copy": 1 / 16, "mapping": 1 / 6}[task])


def test_alphabet_from_a_tokenizer_uses_single_token_words(small_data):
    tokenizer = Tokenizer.from_file(small_data[1])
    alphabet = TaskAlphabet.from_tokenizer(tokenizer)
    assert len(alphabet.symbols) >= 16
    for s in alphabet.symbols:
        text = tokenizer.decode([s])
        assert text.startswith(" ") and text[1:].isalpha() and tokenizer.encode(text) == [s]
    assert [tokenizer.decode([t]) for t in (alphabet.pair, alphabet.item, alphabet.line)] == [":", ",", "\n"]
    text = tokenizer.decode(list(generate("recall", alphabet, 1)[0].tokens[1:]))
    assert text.count(":") == 12 and text.count("\n") == 1
    with pytest.raises(ValueError, match="at least 16"):
        TaskAlphabet.from_tokenizer(tokenizer, max_symbols=3)


def test_word_level_tokenizer_and_a_task_corpus_written_with_it(tmp_path):
    words = [":", ",", "\n", " cat", " cats", " dog", *(f" w{c}{d}" for c in "abcd" for d in "efgh")]
    tokenizer = word_level_tokenizer(words)
    tokenizer.save(tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tokenizer.bos_id == BOS_ID and tokenizer.vocab_size == 2 + len(words)
    assert [tokenizer.encode(w) for w in words] == [[2 + i] for i in range(len(words))]
    assert tokenizer.encode(" cats cat:") == [6, 5, 2]  # the longer word first
    assert tokenizer.encode(" bird") == [1]  # <|unk|>
    assert tokenizer.token_bytes()[[0, 1, 5, 6]].tolist() == [0, 0, 4, 5]
    alphabet = TaskAlphabet.from_tokenizer(tokenizer)
    assert (alphabet.pair, alphabet.item, alphabet.line, alphabet.symbols) == (2, 3, 4, tuple(range(5, 2 + len(words))))
    write_task_corpus(tmp_path / "train.jsonl", tokenizer, alphabet, docs=7, seed=3, tasks=["copy", "recall"])
    texts = [json.loads(line)["text"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    expected = generate("copy", alphabet, 4, seed=3) + generate("recall", alphabet, 4, seed=3)
    assert len(texts) == 7
    assert all([alphabet.bos, *tokenizer.encode(t)] in [list(e.tokens) for e in expected] for t in texts)


def test_model_logits_in_each_mode_match_their_definitions():
    """exact = the full-recompute recurrence, zero = one pass with zero memory; with one position
    per subset the schedule is exact too, so all three modes give the same ICL scores."""
    args = tiny_args(lrt={"num_subsets": 34})
    model = tiny_model(args)
    examples = generate("copy", TaskAlphabet.from_vocab(args.vocab_size, args.bos_token_id), 3)
    tokens = pad_right([e.tokens for e in examples], args.bos_token_id)
    reference, _ = sequential_recurrence(model, tokens)
    torch.testing.assert_close(sequence_logits(model, tokens, "exact"), reference, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sequence_logits(model, tokens, "schedule"), reference, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sequence_logits(model, tokens, "zero"), baseline(model, tokens).logits)
    alphabet = TaskAlphabet.from_vocab(args.vocab_size, args.bos_token_id)
    scores = evaluate_icl({m: model_predictor(model, m) for m in ("exact", "schedule", "zero")}, alphabet, examples=4)
    assert set(scores) == set(TASKS)
    assert scores["copy"]["exact"] == scores["copy"]["schedule"]  # 34 tokens: one position per subset
    for by_mode in scores.values():
        assert all(0 <= s.choice_accuracy <= 1 and s.answers > 0 for s in by_mode.values())


def test_too_long_for_the_model_is_a_clear_error():
    model = tiny_model(tiny_args(max_seq_len=32))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        sequence_logits(model, torch.ones(1, 40, dtype=torch.long), "zero")
