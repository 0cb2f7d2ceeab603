"""Scoring the synthetic in-context learning tasks by next-token predictions at the answer positions.

Two accuracies per task: `accuracy`, where the prediction is the argmax over
the whole vocabulary, and `choice_accuracy`, the argmax over the answer's
candidates only (graded even for a small model; `chance` is its expected value
for a predictor that guesses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from tqdm import tqdm

from titan_lrt.eval.icl_tasks import TASKS, ICLExample, TaskAlphabet, generate
from titan_lrt.eval.logits import Predictor


@dataclass
class ICLScore:
    answers: int = 0
    correct: int = 0
    choice_correct: int = 0
    chance_sum: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.answers, 1)

    @property
    def choice_accuracy(self) -> float:
        return self.choice_correct / max(self.answers, 1)

    @property
    def chance(self) -> float:
        return self.chance_sum / max(self.answers, 1)

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "choice_accuracy": self.choice_accuracy,
            "chance": self.chance,
            "answers": self.answers,
        }


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(B, longest) long tensor of the sequences, right-padded with pad_id."""
    out = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for b, s in enumerate(sequences):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@torch.no_grad()
def score_examples(predict: Predictor, examples: Sequence[ICLExample], pad_id: int, batch_size: int = 32) -> ICLScore:
    score = ICLScore()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        tokens = pad_right([e.tokens for e in chunk], pad_id)
        logits = predict(tokens)
        for row, example in zip(logits, chunk):
            positions = torch.tensor(example.answer_positions)
            answers = torch.tensor([example.tokens[p] for p in example.answer_positions])
            answer_logits = row[positions - 1]
            candidates = torch.tensor(example.candidates)
            chosen = candidates[answer_logits[:, candidates].argmax(-1)]
            score.answers += len(answers)
            score.correct += int((answer_logits.argmax(-1) == answers).sum())
            score.choice_correct += int((chosen == answers).sum())
            score.chance_sum += len(answers) / len(candidates)
    return score


def evaluate_icl(
    predictors: Mapping[str, Predictor],
    alphabet: TaskAlphabet,
    tasks: Sequence[str] = tuple(TASKS),
    examples: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, dict[str, ICLScore]]:
    """{task: {predictor name (e.g. the mode): score}} on `examples` generated examples per task."""
    results: dict[str, dict[str, ICLScore]] = {}
    jobs = [(task, name) for task in tasks for name in predictors]
    data = {task: generate(task, alphabet, examples, seed) for task in tasks}
    for task, name in tqdm(jobs, desc="ICL tasks", disable=not progress):
        results.setdefault(task, {})[name] = score_examples(predictors[name], data[task], alphabet.bos, batch_size)
    return results
