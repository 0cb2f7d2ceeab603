"""The CORE harness on a small self-made bundle (tests/data/core_bundle): reading and checking
the format, prompt rendering, an oracle scores centered 1.0, a tiny model runs end to end."""

import shutil
from pathlib import Path

import pytest
import torch

from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.eval.core import evaluate_core, example_indices
from titan_lrt.eval.core_bundle import BundleError, build_request, load_bundle, render
from titan_lrt.eval.logits import model_predictor
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.transformer import Transformer

BUNDLE = Path(__file__).parent / "data" / "core_bundle"
LABELS = ["capitals_mc", "opposites_mc", "referents_schema", "sequences_lm", "proverbs_lm"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(small_data):
    return Tokenizer.from_file(small_data[1])


def memorizing_predictor(sequences, vocab_size):
    """An 'oracle' language model that learned these token sequences by heart: after a prefix of
    one of them it is sure of the next token; elsewhere it knows nothing (uniform)."""
    following = {tuple(s[:t]): s[t] for s in sequences for t in range(1, len(s))}

    def predict(tokens):
        logits = torch.zeros(*tokens.shape, vocab_size)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                nxt = following.get(tuple(row[: t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 50.0
        return logits

    return predict


def test_bundle_is_read_with_its_baselines_and_fewshot():
    tasks = load_bundle(BUNDLE)
    assert [t.label for t in tasks] == LABELS
    capitals, opposites, referents, sequences, proverbs = tasks
    assert (capitals.task_type, capitals.num_fewshot, capitals.random_baseline, len(capitals.examples)) == (
        "multiple_choice",
        2,
        0.25,
        6,
    )
    assert opposites.delimiter == "\nAnswer: " and proverbs.delimiter == " "
    assert referents.task_type == "schema" and sequences.task_type == "language_modeling"
    assert [t.label for t in load_bundle(BUNDLE, ["proverbs_lm", "capitals_mc"])] == ["capitals_mc", "proverbs_lm"]


def test_prompts_follow_the_bundle_format():
    capitals, opposites, referents, sequences, _ = load_bundle(BUNDLE)
    prompts, texts = render(opposites, 0)
    assert texts == [
        'Which word means the opposite of "hot"?\nAnswer: cold',
        'Which word means the opposite of "hot"?\nAnswer: warm',
    ]
    prompts, texts = render(capitals, 0)
    shots = texts[0].split("\n\n")
    assert len(shots) == 3 and texts[0].endswith("What is the capital of France?\nAnswer: Paris")
    assert all(s.startswith("Question: What is the capital of") for s in shots[:2])
    assert "France" not in "".join(shots[:2])  # demonstrations never include the example itself
    assert render(capitals, 0) == (prompts, texts)  # the same demonstrations every time
    _, texts = render(referents, 1)
    assert texts[1].endswith("\n\nTom could not lift the box because the box was too heavy.")
    _, texts = render(sequences, 3)
    assert texts[0].endswith("Continue: a, b, c, d") and texts[0].count("\n\n") == 2


def test_requests_score_only_the_continuations(tokenizer):
    capitals, _, referents, sequences, _ = load_bundle(BUNDLE)
    mc = build_request(capitals, 1, tokenizer, max_len=1000)
    assert mc.gold == 1 and len(mc.sequences) == 4
    assert [tokenizer.decode(s[a:b]) for s, (a, b) in zip(mc.sequences, mc.spans)] == [
        " Osaka",
        " Tokyo",
        " Kyoto",
        " Nagoya",
    ]
    schema = build_request(referents, 0, tokenizer, max_len=1000)
    assert {tokenizer.decode(s[a:b]) for s, (a, b) in zip(schema.sequences, schema.spans)} == {" broke into pieces."}
    lm = build_request(sequences, 5, tokenizer, max_len=1000)
    (a, b), seq = lm.spans[0], lm.sequences[0]
    assert tokenizer.decode(seq[a:b]).strip() == "40" and lm.gold is None and seq[0] == tokenizer.bos_id
    assert tokenizer.decode(seq[1:]).endswith("Continue: 10, 20, 30, 40")
    cropped = build_request(capitals, 1, tokenizer, max_len=20)
    assert all(len(s) == 20 for s in cropped.sequences)
    assert [s[a:b] for s, (a, b) in zip(cropped.sequences, cropped.spans)] == [
        s[a:b] for s, (a, b) in zip(mc.sequences, mc.spans)
    ]


def _gold_sequences(tasks, tokenizer, wrong=False):
    sequences = []
    for task in tasks:
        for i in range(len(task.examples)):
            request = build_request(task, i, tokenizer, max_len=1000)
            pick = request.gold or 0
            if wrong and request.gold is not None:
                pick = (pick + 1) % len(request.sequences)
            sequences.append(request.sequences[pick])
    return sequences


def test_an_oracle_scores_100_percent_centered_1(tokenizer):
    tasks = load_bundle(BUNDLE)
    oracle = memorizing_predictor(_gold_sequences(tasks, tokenizer), tokenizer.vocab_size)
    result = evaluate_core(oracle, tasks, tokenizer, max_len=1000)
    assert [t.accuracy for t in result.tasks] == [1.0] * 5
    assert [t.centered for t in result.tasks] == [1.0] * 5
    assert result.core == 1.0
    report = result.to_dict()
    assert report["tasks"]["capitals_mc"] == {"accuracy": 1.0, "centered": 1.0, "random_baseline": 0.25, "examples": 6}
    # an oracle of the wrong answers: every choice task scores 0 and is centered below 0
    liar = memorizing_predictor(_gold_sequences(tasks, tokenizer, wrong=True), tokenizer.vocab_size)
    wrong = {t.label: t for t in evaluate_core(liar, tasks, tokenizer, max_len=1000).tasks}
    assert wrong["capitals_mc"].accuracy == 0 and wrong["capitals_mc"].centered == pytest.approx(-1 / 3)
    assert wrong["referents_schema"].centered == -1.0
    assert wrong["sequences_lm"].accuracy == 1.0  # no choices to get wrong


def test_a_tiny_model_runs_end_to_end(tokenizer):
    args = ModelArgs(
        vocab_size=tokenizer.vocab_size,
        n_layers=2,
        dim=64,
        n_heads=2,
        max_seq_len=64,
        bos_token_id=tokenizer.bos_id,
        lrt=LRTArgs(mode="interleaved"),
    )
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model.eval()
    tasks = load_bundle(BUNDLE)
    for mode in ("schedule", "exact", "zero"):
        result = evaluate_core(model_predictor(model, mode), tasks, tokenizer, max_len=64, max_per_task=3)
        assert [t.examples for t in result.tasks] == [3] * 5
        assert all(0 <= t.accuracy <= 1 for t in result.tasks) and -1 <= result.core <= 1
    subset = example_indices(tasks[0], 3)
    assert subset == sorted(subset) == example_indices(tasks[0], 3) and len(set(subset)) == 3
    assert example_indices(tasks[0], 0) == example_indices(tasks[0], 100) == list(range(6))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda b: (b / "core.yaml").unlink(), "no core.yaml"),
        (lambda b: (b / "eval_meta_data.csv").unlink(), "eval_meta_data.csv: missing"),
        (lambda b: (b / "eval_data/language/proverbs.jsonl").unlink(), "proverbs.jsonl: missing"),
        (lambda b: _edit(b / "core.yaml", "icl_task_type: schema", "icl_task_type: generation"), "allowed"),
        (lambda b: _edit(b / "core.yaml", "num_fewshot: [2]", "num_fewshot: [two]"), "num_fewshot"),
        (lambda b: _edit(b / "core.yaml", "num_fewshot: [2]", "num_fewshot: [9]"), "needs more than 6 examples"),
        (lambda b: _edit(b / "eval_meta_data.csv", "opposites_mc,", "antonyms,"), "no 'Random baseline' row"),
        (lambda b: _edit(b / "eval_data/world/capitals.jsonl", '"gold": 3', '"gold": 4'), r"capitals.jsonl:4: gold=4"),
        (
            lambda b: _edit(b / "eval_data/language/referents.jsonl", '"continuation"', '"ending"'),
            r"referents.jsonl:1: a schema example needs 'continuation'",
        ),
        (lambda b: _edit(b / "core.yaml", "icl_tasks:", "tasks:"), "'icl_tasks'"),
    ],
)
def test_a_malformed_bundle_is_a_clear_error(tmp_path, breakage, message):
    bundle = tmp_path / "eval_bundle"
    shutil.copytree(BUNDLE, bundle)
    breakage(bundle)
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)


def test_a_folder_holding_eval_bundle_is_accepted_and_a_missing_one_is_a_clear_error(tmp_path):
    shutil.copytree(BUNDLE, tmp_path / "eval_bundle")
    assert [t.label for t in load_bundle(tmp_path)] == LABELS
    with pytest.raises(BundleError, match="no such folder"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match=r"\['hellaswag'\] are not in"):
        load_bundle(BUNDLE, ["hellaswag"])


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
