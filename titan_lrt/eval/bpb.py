"""Bits per byte: per pass, merged (as trained), exact (true recurrence), zero memory.

bpb = (sum of next-token losses in nats) / ln 2 / (UTF-8 bytes of the target
tokens). Counting bytes instead of tokens makes models with different
tokenizers comparable; special tokens (BOS) and ignored targets count zero
bytes and are scored with weight zero.

Modes (`MODES`):
- `passes`: each pass of the training schedule, on the positions it computed;
- `merged`: each position scored by the last pass that computed it (what
  training optimises; one schedule run gives both);
- `exact`: the true recurrence by batched KV-cache decoding, one step per
  position (slow, so only on the first `exact_sequences` sequences);
- `zero`: one parallel pass with zero memory (the model without its recurrence).

Every score is also split by position in the sequence (buckets 0-63, 64-255,
256-1023, ...), and the merged score is kept on the exact sample as well, so
that the merged-minus-exact gap compares the same tokens.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from titan_lrt.model.decoding import recurrent_token_losses
from titan_lrt.model.schedule import baseline, run_schedule
from titan_lrt.model.transformer import IGNORE_INDEX, Transformer

MODES = ("merged", "passes", "exact", "zero")
MERGED_ON_EXACT = "merged_on_exact_sample"


def position_buckets(seq_len: int, first: int = 64, factor: int = 4) -> list[int]:
    """Start positions of the buckets: 0, first, first * factor, ... below seq_len."""
    starts, edge = [0], first
    while edge < seq_len:
        starts.append(edge)
        edge *= factor
    return starts


@dataclass
class BitsPerByte:
    """Nats and bytes per position bucket; batches (and ranks) combine exactly by summing."""

    bucket_starts: list[int] = field(default_factory=lambda: [0])
    nats: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.nats = self.nats or [0.0] * len(self.bucket_starts)
        self.bytes = self.bytes or [0] * len(self.bucket_starts)

    def add(self, token_loss: Tensor, target_bytes: Tensor, positions: Optional[Tensor] = None) -> None:
        """token_loss, target_bytes: (B, n); positions: (n,) their positions (default 0..n-1)."""
        n = token_loss.size(1)
        if positions is None:
            positions = torch.arange(n, device=token_loss.device)
        starts = torch.tensor(self.bucket_starts, device=positions.device)
        bucket = torch.bucketize(positions, starts, right=True) - 1
        scored = target_bytes > 0
        nats = torch.where(scored, token_loss.double(), 0.0).sum(0)
        k = len(self.bucket_starts)
        nats = torch.zeros(k, dtype=torch.float64, device=nats.device).index_add_(0, bucket, nats)
        nbytes = torch.zeros(k, dtype=torch.long, device=nats.device).index_add_(0, bucket, target_bytes.sum(0))
        self.nats = [a + b for a, b in zip(self.nats, nats.tolist())]
        self.bytes = [a + b for a, b in zip(self.bytes, nbytes.tolist())]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes)

    @property
    def value(self) -> float:
        return _bpb(sum(self.nats), self.total_bytes)

    def buckets(self, seq_len: int) -> list[dict]:
        """One entry per position bucket: first and last position, bpb, bytes."""
        ends = self.bucket_starts[1:] + [seq_len]
        return [
            {"positions": f"{start}-{end - 1}", "bpb": _bpb(nats, nbytes), "bytes": nbytes}
            for start, end, nats, nbytes in zip(self.bucket_starts, ends, self.nats, self.bytes)
        ]


@dataclass
class Throughput:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalResult:
    scores: dict[str, BitsPerByte] = field(default_factory=dict)
    """By name: "merged", "pass0", "pass1", ..., "exact", "zero", and "merged_on_exact_sample"."""

    throughput: dict[str, Throughput] = field(default_factory=dict)
    """Evaluation speed by what ran: "schedule" (merged and passes), "exact", "zero"."""

    def all_reduce(self) -> None:
        """Sum the counts of all data-parallel ranks (each scored its own shard)."""
        if not torch.distributed.is_initialized():
            return
        names = sorted(self.scores)
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        totals = torch.tensor(
            [[*self.scores[n].nats, *map(float, self.scores[n].bytes)] for n in names],
            dtype=torch.float64,
            device=device,
        )
        torch.distributed.all_reduce(totals)
        for name, row in zip(names, totals.tolist()):
            score = self.scores[name]
            k = len(score.bucket_starts)
            score.nats, score.bytes = row[:k], [int(b) for b in row[k:]]

    @property
    def merged_minus_exact(self) -> Optional[float]:
        """Train/inference consistency: merged minus exact bpb on the same sequences."""
        if "exact" not in self.scores or not self.scores["exact"].total_bytes:
            return None
        return self.scores[MERGED_ON_EXACT].value - self.scores["exact"].value

    def to_dict(self, seq_len: int) -> dict:
        """JSON-ready: every score with its position buckets, the gap, the throughput."""
        return {
            "scores": {
                name: {"bpb": s.value, "bytes": s.total_bytes, "buckets": s.buckets(seq_len)}
                for name, s in self.scores.items()
            },
            "merged_minus_exact": self.merged_minus_exact,
            "throughput": {
                kind: {"tokens": t.tokens, "seconds": t.seconds, "tokens_per_s": t.tokens_per_s}
                for kind, t in self.throughput.items()
            },
        }

    def scalars(self) -> dict[str, float]:
        out = {f"val/bpb_{name}": s.value for name, s in self.scores.items() if name != MERGED_ON_EXACT}
        if self.merged_minus_exact is not None:
            out["val/bpb_merged_minus_exact"] = self.merged_minus_exact
        return out


@torch.no_grad()
def evaluate_bpb(
    model: Transformer,
    batches: Iterable[tuple[Tensor, Tensor]],
    token_bytes: Tensor,
    exact_sequences: int = 0,
    autocast=None,
    modes: Sequence[str] = ("merged", "passes", "exact"),
    bucket_starts: Optional[Sequence[int]] = None,
) -> EvalResult:
    """Score batches in the given modes; `exact` covers the first `exact_sequences` sequences.

    bucket_starts: first position of each position bucket (default: `position_buckets`
    of the batches' length).
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"bpb modes {bad}: allowed {MODES}")
    result = EvalResult()
    remaining_exact = exact_sequences if "exact" in modes else 0
    amp = autocast or contextlib.nullcontext()

    def score(name: str) -> BitsPerByte:
        if name not in result.scores:
            result.scores[name] = BitsPerByte(list(starts))
        return result.scores[name]

    def timed(kind: str, tokens: int):
        result.throughput.setdefault(kind, Throughput()).tokens += tokens
        return _Stopwatch(result.throughput[kind], model)

    for inputs, targets in batches:
        starts = bucket_starts if bucket_starts is not None else position_buckets(inputs.size(1))
        target_bytes = torch.where(targets == IGNORE_INDEX, 0, token_bytes[targets.clamp(min=0)])
        if "merged" in modes or "passes" in modes or remaining_exact > 0:  # merged is kept on the exact sample
            with timed("schedule", inputs.numel()), amp:
                step = run_schedule(model, inputs, targets)
            if "merged" in modes:
                score("merged").add(step.token_loss, target_bytes)
            if "passes" in modes:
                for i, (loss, positions) in enumerate(zip(step.pass_token_losses, step.pass_positions)):
                    score(f"pass{i}").add(loss, target_bytes[:, positions], positions)
        if "zero" in modes:
            with timed("zero", inputs.numel()), amp:
                zero = baseline(model, inputs, targets)
            score("zero").add(zero.token_loss, target_bytes)
        if remaining_exact > 0:
            n = min(remaining_exact, inputs.size(0))
            with timed("exact", n * inputs.size(1)), amp:
                exact = recurrent_token_losses(model, inputs[:n], targets[:n])
            score("exact").add(exact, target_bytes[:n])
            score(MERGED_ON_EXACT).add(step.token_loss[:n], target_bytes[:n])
            remaining_exact -= n
    return result


def _bpb(nats: float, nbytes: int) -> float:
    return nats / math.log(2) / max(nbytes, 1)


class _Stopwatch:
    """Adds the wall time of its block to a Throughput (waiting for the GPU to finish)."""

    def __init__(self, into: Throughput, model: Transformer):
        self.into, self.cuda = into, model.rope_cos.is_cuda

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        self.into.seconds += time.perf_counter() - self.start

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()
