"""Next-token logits of whole sequences in the three inference modes of DESIGN 2.3.

- `exact`: the true recurrence, batched KV-cache decoding one position at a time;
- `schedule`: the training schedule's merged logits (one run of all its passes);
- `zero`: one parallel pass with zero memory.

Rows may be right-padded: every mode is causal, so padding never changes the
logits of the positions before it. For a baseline (LRT off) the three agree.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from titan_lrt.model.decoding import DecodeState, decode_step
from titan_lrt.model.schedule import baseline, run_schedule
from titan_lrt.model.transformer import Transformer

LOGIT_MODES = ("exact", "schedule", "zero")

Predictor = Callable[[Tensor], Tensor]
"""(B, T) token ids -> (B, T, vocab) logits, row t predicting token t + 1."""


@torch.no_grad()
def sequence_logits(model: Transformer, tokens: Tensor, mode: str) -> Tensor:
    """(B, T) -> (B, T, vocab) fp32 logits of the next token at every position."""
    if tokens.size(1) > model.args.max_seq_len:
        raise ValueError(f"sequences of {tokens.size(1)} tokens: the model covers max_seq_len={model.args.max_seq_len}")
    if mode == "exact":
        state = DecodeState.empty(model, tokens.size(0), tokens.size(1), tokens.device, next(model.parameters()).dtype)
        return torch.stack([decode_step(model, state, tokens[:, t]) for t in range(tokens.size(1))], dim=1)
    if mode == "schedule":
        return run_schedule(model, tokens).logits
    if mode == "zero":
        return baseline(model, tokens).logits
    raise ValueError(f"logit mode {mode!r}: allowed {LOGIT_MODES}")


def model_predictor(model: Transformer, mode: str, autocast=None) -> Predictor:
    """A predictor that runs `model` in `mode` on the model's device (under `autocast`, if given)."""
    if mode not in LOGIT_MODES:
        raise ValueError(f"logit mode {mode!r}: allowed {LOGIT_MODES}")
    device = model.rope_cos.device

    def predict(tokens: Tensor) -> Tensor:
        with autocast or contextlib.nullcontext():
            return sequence_logits(model, tokens.to(device), mode).float().cpu()

    return predict
