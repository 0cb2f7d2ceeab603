"""Parameter counts and the FLOPs each pass really executes (DESIGN 2.4 "Cost").

FLOPs are counted as 2 per multiply-add; a training pass costs 3x its forward
(backward = 2x). Attention counts the key/query pairs actually computed:
causal attention over T positions scores T(T+1)/2 pairs, and the S subset
passes of a step together score exactly as many (every query attends the keys
at or before its position). Embedding lookups, norms and element-wise ops are
not counted, as is customary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.transformer import Transformer

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)


@dataclass
class ParameterCounts:
    total: int
    backbone: int
    """Parameters of the same model with the LRT pathway off."""
    feedback: int
    """What the pathway adds: feedback projections, feedback gate rows, gammas."""

    @property
    def feedback_percent(self) -> float:
        return 100.0 * self.feedback / self.total

    def describe(self) -> str:
        return (
            f"parameters: {self.total:,} total, {self.backbone:,} backbone, "
            f"{self.feedback:,} LRT pathway ({self.feedback_percent:.3f}% of total)"
        )


def count_parameters(args: ModelArgs) -> ParameterCounts:
    def count(a: ModelArgs) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(a).parameters())

    total = count(args)
    backbone = count(args.replace(lrt=LRTArgs(mode="off")))
    return ParameterCounts(total=total, backbone=backbone, feedback=total - backbone)


@dataclass
class StepFlops:
    """Training FLOPs per token of the input sequence, per pass and for the step."""

    passes: dict[str, float]
    total: float
    baseline: float
    """A plain pass of the same backbone (the matched baseline's step)."""

    @property
    def baseline_ratio(self) -> float:
        return self.total / self.baseline


def _avg_keys(seq_len: int, window: int) -> float:
    """Mean number of keys a causal query attends to over positions 0..T-1."""
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # positions t < W see t + 1 keys, the rest see W
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def forward_flops_per_token(args: ModelArgs, seq_len: int, with_memory: bool) -> float:
    """Forward FLOPs per token of one pass over positions with causal attention.

    with_memory: whether the pass reads a non-zero memory (pays the feedback
    projection); pass 0 skips it.
    """
    dim, kv_dim, q_dim = args.dim, args.kv_dim, args.n_heads * args.head_dim
    macs = 0.0
    injected = set(args.injected_layers())
    for layer in range(args.n_layers):
        macs += dim * (2 * q_dim + 2 * kv_dim)  # wq, wk, wv, wo
        macs += 2 * dim * args.mlp_ratio * dim  # w1, w2
        n_gates = (2 if args.lrt.kv_feedback and layer in injected else 0) + int(args.has_value_embed(layer))
        macs += (args.gate_channels or dim) * n_gates * args.kv_heads
        macs += 2 * q_dim * _avg_keys(seq_len, args.window(layer))  # QK^T and PV
    macs += dim * args.padded_vocab_size  # LM head
    if with_memory and args.lrt.enabled and args.lrt.kv_feedback:
        n_pairs = 1 if args.lrt.projection == "shared" else len(injected)
        macs += dim * 2 * kv_dim * n_pairs
    return 2 * macs


def step_flops(args: ModelArgs, seq_len: int, passes: int | None = None) -> StepFlops:
    """Training FLOPs per token of one step of the configured schedule that runs `passes` passes
    (default: all of them; see `LRTArgs.passes_at`). Pass 0 without autograd costs its forward only."""
    lrt = args.lrt
    passes = passes or lrt.num_passes
    pass0 = (TRAIN_MULTIPLIER if lrt.trains_pass0(passes) else 1) * forward_flops_per_token(args, seq_len, False)
    refined = TRAIN_MULTIPLIER * forward_flops_per_token(args, seq_len, with_memory=True)
    baseline = TRAIN_MULTIPLIER * forward_flops_per_token(args.replace(lrt=LRTArgs(mode="off")), seq_len, False)
    spans = lrt.pass_positions(seq_len, passes)
    passes_flops = {
        name: (pass0 if k == 0 else refined) * len(span) / seq_len
        for k, (name, span) in enumerate(zip(lrt.pass_names, spans))
    }
    if lrt.refreshes_kv and len(spans) > 1:
        # before subset pass i, the subsets j > i re-project the memory: (S - 1) / 2 of the positions on average
        n_pairs = 1 if lrt.projection == "shared" else len(args.injected_layers())
        proj = 2 * args.dim * 2 * args.kv_dim * n_pairs
        subsets = spans[1:]
        refreshed = sum(len(later) for i in range(len(subsets)) for later in subsets[i + 1 :]) / seq_len
        passes_flops["kv_refresh"] = (TRAIN_MULTIPLIER if not lrt.detach_buffer else 1) * proj * refreshed
    return StepFlops(passes=passes_flops, total=sum(passes_flops.values()), baseline=baseline)


def run_flops(args: ModelArgs, seq_len: int, steps: int, seed: int, first_step: int = 0) -> list[float]:
    """Cumulative training FLOPs per token of the input after each optimizer step first_step..steps-1,
    as the schedule options (refine_fraction, start_step, jacobi_mix) choose each step's passes: the sum
    of `step_flops` over the steps run, per token of one step's batch."""
    per_kind: dict[int, float] = {}
    total, cumulative = 0.0, []
    for step in range(first_step, steps):
        passes = args.lrt.passes_at(step, seed)
        if passes not in per_kind:
            per_kind[passes] = step_flops(args, seq_len, passes).total
        total += per_kind[passes]
        cumulative.append(total)
    return cumulative


def published_step_flops(args: ModelArgs, seq_len: int, passes: int | None = None) -> float:
    """Training FLOPs per token of one step in the convention nanochat and torchtitan
    publish: 6N + 12 L H Q T per token and full pass (N the non-embedding parameters).

    It differs from `step_flops` only in attention: every query is counted against
    all T keys (its window's keys in a sliding-window layer, as nanochat does) rather
    than the causal T / 2 executed. A step makes as many full passes as pass 0 plus
    its refinements cover: 1 (baseline), 2 (interleaved: the S subset passes cover
    T positions together), jacobi_passes (Jacobi).
    """
    lrt = args.lrt
    spans = lrt.pass_positions(seq_len, passes)
    pass0_multiplier = TRAIN_MULTIPLIER if lrt.trains_pass0(len(spans)) else 1
    trained_full_passes = (pass0_multiplier * len(spans[0]) + TRAIN_MULTIPLIER * sum(map(len, spans[1:]))) / seq_len
    q_dim = args.n_heads * args.head_dim
    uncounted_keys = sum(
        min(args.window(layer) or seq_len, seq_len) - _avg_keys(seq_len, args.window(layer))
        for layer in range(args.n_layers)
    )
    return step_flops(args, seq_len, passes).total + trained_full_passes * 2 * 2 * q_dim * uncounted_keys
