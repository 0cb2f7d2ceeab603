"""CORE-style evaluation: accuracy per task of a bundle, centered by its random baseline.

multiple_choice and schema: the prediction is the sequence whose scored span has
the lowest mean loss; language_modeling: correct when the greedy (argmax)
prediction of every continuation token is right. centered = (accuracy - random
baseline) / (1 - random baseline); the CORE score is the mean centered accuracy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from titan_lrt.eval.core_bundle import CoreTask, Request, TextEncoder, build_request
from titan_lrt.eval.icl import pad_right
from titan_lrt.eval.logits import Predictor


@dataclass
class TaskScore:
    label: str
    random_baseline: float
    correct: int = 0
    examples: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.examples, 1)

    @property
    def centered(self) -> float:
        return (self.accuracy - self.random_baseline) / (1.0 - self.random_baseline)

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "centered": self.centered,
            "random_baseline": self.random_baseline,
            "examples": self.examples,
        }


@dataclass
class CoreResult:
    tasks: list[TaskScore] = field(default_factory=list)

    @property
    def core(self) -> float:
        return sum(t.centered for t in self.tasks) / max(len(self.tasks), 1)

    def to_dict(self) -> dict:
        return {"core": self.core, "tasks": {t.label: t.to_dict() for t in self.tasks}}


@torch.no_grad()
def is_correct(predict: Predictor, request: Request, task_type: str, pad_id: int) -> bool:
    tokens = pad_right(request.sequences, pad_id)
    logits = predict(tokens).float()  # row t predicts token t + 1
    if task_type == "language_modeling":
        start, end = request.spans[0]
        return bool((logits[0, start - 1 : end - 1].argmax(-1) == tokens[0, start:end]).all())
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T - 1)
    mean_losses = [float(losses[b, start - 1 : end - 1].mean()) for b, (start, end) in enumerate(request.spans)]
    return mean_losses.index(min(mean_losses)) == request.gold


def example_indices(task: CoreTask, max_per_task: int) -> list[int]:
    """All examples, or a fixed random subset of max_per_task of them (> 0)."""
    indices = list(range(len(task.examples)))
    if 0 < max_per_task < len(indices):
        random.Random(1337).shuffle(indices)
        indices = sorted(indices[:max_per_task])
    return indices


def evaluate_core(
    predict: Predictor,
    tasks: Sequence[CoreTask],
    tokenizer: TextEncoder,
    max_len: int,
    max_per_task: int = 0,
    progress: bool = False,
) -> CoreResult:
    """Score every task of the bundle (max_per_task > 0: a fixed subset of each)."""
    result = CoreResult()
    for task in tasks:
        score = TaskScore(task.label, task.random_baseline)
        indices = example_indices(task, max_per_task)
        for i in tqdm(indices, desc=f"CORE {task.label}", disable=not progress, leave=False):
            request = build_request(task, i, tokenizer, max_len)
            score.correct += is_correct(predict, request, task.task_type, tokenizer.bos_id)
            score.examples += 1
        result.tasks.append(score)
    return result
