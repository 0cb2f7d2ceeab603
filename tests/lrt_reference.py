"""Naive references the LRT tests compare against: slow, obvious, full recompute."""

from __future__ import annotations

import torch

from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.transformer import Transformer


def tiny_args(**overrides) -> ModelArgs:
    """A small model that still exercises GQA, value embeddings and several layers."""
    lrt = overrides.pop("lrt", {})
    base = dict(
        vocab_size=61,
        n_layers=3,
        dim=32,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        value_embeds="alternate",
        gate_channels=8,
        bos_token_id=1,
    )
    base.update(overrides)
    return ModelArgs(**base, lrt=LRTArgs(**{"mode": "interleaved", **lrt}))


def tiny_model(args: ModelArgs, seed: int = 0, perturb: bool = True) -> Transformer:
    """fp64 model; `perturb` moves every weight off its (often zero) init so that all
    paths carry signal and every gradient is non-zero."""
    torch.manual_seed(seed)
    model = Transformer(args).double()
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


def sample_tokens(args: ModelArgs, batch: int, T: int, seed: int = 1, bos_every: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, args.vocab_size, (batch, T), generator=g)
    if bos_every:
        tokens[:, ::bos_every] = args.bos_token_id
        tokens[1:, 3] = args.bos_token_id  # a document start off the regular grid
    return tokens


@torch.no_grad()
def sequential_recurrence(model: Transformer, tokens: torch.Tensor, zero_memory_until: int = 0):
    """Exact recurrence by full recomputation: position t is computed by a full
    pass over tokens[:, :t+1] whose memory holds the exact states of the steps before.

    Positions < zero_memory_until get zero memory (the `zero` prefill of a prompt).
    Returns logits (B, T, V) and source states (B, T, C).
    """
    args = model.args
    B, T = tokens.shape
    memory = torch.zeros(B, T, args.dim, dtype=torch.float64)
    logits, states = [], []
    for t in range(T):
        out = model(tokens[:, : t + 1], memory=memory[:, : t + 1].clone())
        logits.append(out.logits[:, t])
        states.append(out.states[:, t])
        if t + 1 < T and t + 1 >= zero_memory_until:
            keep = tokens[:, t + 1] != args.bos_token_id if args.lrt.reset_at_bos else torch.ones(B, dtype=torch.bool)
            memory[:, t + 1] = out.states[:, t] * keep[:, None]
    return torch.stack(logits, 1), torch.stack(states, 1)
