"""Bits per byte: per pass, merged (as trained), and exact (true recurrence).

bpb = (sum of next-token losses in nats) / ln 2 / (UTF-8 bytes of the target
tokens). Counting bytes instead of tokens makes models with different
tokenizers comparable; special tokens (BOS) count zero bytes and are scored
with weight zero.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor

from titan_lrt.model.decoding import recurrent_token_losses
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer


@dataclass
class BitsPerByte:
    """Accumulates (nats, bytes) so that batches combine exactly."""

    nats: float = 0.0
    bytes: int = 0

    def add(self, token_loss: Tensor, target_bytes: Tensor) -> None:
        weight = (target_bytes > 0).to(token_loss.dtype)
        self.nats += float((token_loss * weight).sum())
        self.bytes += int(target_bytes.sum())

    @property
    def value(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)


@dataclass
class EvalResult:
    merged: BitsPerByte = field(default_factory=BitsPerByte)
    passes: list[BitsPerByte] = field(default_factory=list)
    exact: BitsPerByte = field(default_factory=BitsPerByte)
    merged_on_exact_sample: BitsPerByte = field(default_factory=BitsPerByte)

    def all_reduce(self) -> None:
        """Sum the counts of all data-parallel ranks (each scored its own shard)."""
        if not torch.distributed.is_initialized():
            return
        parts = [self.merged, *self.passes, self.exact, self.merged_on_exact_sample]
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        totals = torch.tensor([[p.nats, float(p.bytes)] for p in parts], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        for p, (nats, nbytes) in zip(parts, totals.tolist()):
            p.nats, p.bytes = nats, int(nbytes)

    def scalars(self) -> dict[str, float]:
        out = {"val/bpb_merged": self.merged.value}
        for i, p in enumerate(self.passes):
            out[f"val/bpb_pass{i}"] = p.value
        if self.exact.bytes:
            out["val/bpb_exact"] = self.exact.value
            out["val/bpb_merged_minus_exact"] = self.merged_on_exact_sample.value - self.exact.value
        return out


@torch.no_grad()
def evaluate_bpb(
    model: Transformer,
    batches: Iterable[tuple[Tensor, Tensor]],
    token_bytes: Tensor,
    exact_sequences: int = 0,
    autocast=None,
) -> EvalResult:
    """Score batches with the training schedule (merged and per pass), and the first
    `exact_sequences` sequences also with the exact recurrence."""
    result = EvalResult()
    remaining_exact = exact_sequences
    for inputs, targets in batches:
        target_bytes = token_bytes[targets]
        with autocast or contextlib.nullcontext():
            step = run_schedule(model, inputs, targets)
        result.merged.add(step.token_loss, target_bytes)
        while len(result.passes) < len(step.pass_token_losses):
            result.passes.append(BitsPerByte())
        for bpb, loss, positions in zip(result.passes, step.pass_token_losses, step.pass_positions):
            bpb.add(loss, target_bytes[:, positions])
        if remaining_exact > 0:
            n = min(remaining_exact, inputs.size(0))
            with autocast or contextlib.nullcontext():
                exact = recurrent_token_losses(model, inputs[:n], targets[:n])
            result.exact.add(exact, target_bytes[:n])
            result.merged_on_exact_sample.add(step.token_loss[:n], target_bytes[:n])
            remaining_exact -= n
    return result

