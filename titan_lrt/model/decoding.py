"""Decoding with true recurrence (DESIGN 2.3).

The decoding state is a KV cache plus one vector per sequence: the source
state s_{t-1} of its last token. Every decoded token gets the exact memory
m_t = s_{t-1} (reset at BOS), so generation runs the recurrence the schedules
approximate in training. Prefill modes:

- `exact`: the prompt goes token by token through the decode step (ground truth);
- `schedule`: the training schedule runs over the prompt, the cache is filled
  with the merged K/V and decoding continues from the merged last state;
- `zero`: one parallel pass with zero memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from titan_lrt.model.block import CacheKeys
from titan_lrt.model.memory import apply_reset, memory_keep_mask
from titan_lrt.model.schedule import baseline, run_schedule
from titan_lrt.model.transformer import IGNORE_INDEX, Transformer

PREFILL_MODES = ("exact", "schedule", "zero")


@dataclass
class DecodeState:
    keys: list[Tensor]
    """Per layer (B, Hkv, Tmax, D)."""
    values: list[Tensor]
    lengths: Tensor
    """(B,) number of valid cache entries (= position of the next token)."""
    last_state: Tensor
    """(B, dim) source state of each sequence's last processed token."""

    @classmethod
    def empty(cls, model: Transformer, batch: int, max_len: int, device, dtype) -> DecodeState:
        a = model.args
        if max_len > a.max_seq_len:
            raise ValueError(f"decoding needs {max_len} positions but model.max_seq_len={a.max_seq_len}")
        shape = (batch, a.kv_heads, max_len, a.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.n_layers)],
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
            last_state=torch.zeros(batch, a.dim, device=device, dtype=dtype),
        )


@torch.no_grad()
def decode_step(model: Transformer, state: DecodeState, tokens: Tensor, active: Optional[Tensor] = None) -> Tensor:
    """Feed one token per sequence; returns its logits (B, vocab).

    Sequences with active[b] False are computed but their state does not move.
    Runs the compiled step where `compile_decode_step` registered one for the model.
    """
    step = _COMPILED_STEPS.get(model, _step)
    logits, state.lengths, state.last_state = step(
        model, state.keys, state.values, state.lengths, state.last_state, tokens, active
    )
    return logits


def _step(
    model: Transformer,
    keys: list[Tensor],
    values: list[Tensor],
    lengths: Tensor,
    last_state: Tensor,
    tokens: Tensor,
    active: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step as a function of tensors (the compiled unit): writes the new
    K/V into the caches in place, returns (logits, lengths, last_state)."""
    positions = lengths[:, None]
    memory = None
    if model.args.lrt.enabled:
        keep = memory_keep_mask(tokens[:, None], positions, model.args.bos_token_id, model.args.lrt.reset_at_bos)
        memory = apply_reset(last_state[:, None], keep)
    cache = [CacheKeys(k, v, lengths) for k, v in zip(keys, values)]
    out = model(tokens[:, None], positions=positions, memory=memory, keys=cache)
    rows = torch.arange(tokens.size(0), device=tokens.device)
    write_at = lengths.clamp(max=keys[0].size(2) - 1)
    for layer, kv in enumerate(out.kv):
        keys[layer][rows, :, write_at] = kv.k[:, :, 0].to(keys[layer].dtype)
        values[layer][rows, :, write_at] = kv.v[:, :, 0].to(values[layer].dtype)
    step = torch.ones_like(lengths) if active is None else active.long()
    new_state = out.states[:, 0].to(last_state.dtype)
    last_state = new_state if active is None else torch.where(active[:, None], new_state, last_state)
    return out.logits[:, 0], lengths + step, last_state


_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_decode_step(model: Transformer, backend: str = "inductor", cuda_graphs: bool = False) -> None:
    """Compile the whole decode step of `model` into one graph (both models alike).

    A step is one token per sequence through every layer: launch-bound on a GPU
    when run op by op. Compiled, the feedback projection, the gates, attention
    over the cache and the cache writes fuse into a few kernels. Shapes are
    static (the cache is allocated at its full length), so a graph is built once
    per batch size and cache length. Use on a model whose blocks are not
    compiled on their own (`apply_compile` compiles per block for training).

    cuda_graphs (opt-in, CUDA only): also replay the step as a CUDA graph
    (inductor's "reduce-overhead"), one launch per step; on other devices the
    plain compiled step runs (see `decode_compile_options`).
    """
    options = decode_compile_options(model.rope_cos.device, backend, cuda_graphs)
    compiled = torch.compile(_step, backend=backend, dynamic=False, fullgraph=True, **options)
    _COMPILED_STEPS[model] = _graphed(compiled) if options else compiled


def decode_compile_options(device: torch.device, backend: str, cuda_graphs: bool) -> dict:
    """torch.compile options of the decode step: CUDA graphs ("reduce-overhead") only when
    asked for and on CUDA with inductor; elsewhere none (the CPU fallback: a plain compile)."""
    if not cuda_graphs or torch.device(device).type != "cuda":
        return {}
    if backend != "inductor":
        raise ValueError(f"CUDA-graph decoding needs the inductor backend, not {backend!r}")
    return {"mode": "reduce-overhead"}


def _graphed(compiled):
    """A CUDA-graph step: the caches are marked static (written in place by the graph, so
    they keep their addresses), and the outputs are copied out of the graph's memory pool,
    which the next replay overwrites (callers keep logits and state across steps)."""
    import torch._dynamo

    def step(model, keys, values, lengths, last_state, tokens, active):
        for cache in (*keys, *values):
            torch._dynamo.mark_static_address(cache)
        torch.compiler.cudagraph_mark_step_begin()
        outputs = compiled(model, keys, values, lengths, last_state, tokens, active)
        return tuple(t.clone() for t in outputs)

    return step


@torch.no_grad()
def prefill(
    model: Transformer, prompts: Sequence[Sequence[int]], mode: str, max_len: int, dtype=None
) -> tuple[DecodeState, Tensor]:
    """Process the prompts; returns the state and each prompt's last-token logits (B, vocab)."""
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill mode {mode!r}: allowed {PREFILL_MODES}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with BOS)")
    device = model.rope_cos.device
    dtype = dtype or next(model.parameters()).dtype
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    padded = torch.full((B, longest), model.args.bos_token_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    state = DecodeState.empty(model, B, max_len, device, dtype)

    if mode == "exact":
        last_logits = None
        for t in range(longest):
            active = lengths > t
            logits = decode_step(model, state, padded[:, t], active)
            last_logits = logits if last_logits is None else torch.where(active[:, None], logits, last_logits)
        return state, last_logits

    result = baseline(model, padded, return_kv=True) if mode == "zero" else run_schedule(model, padded, return_kv=True)
    for layer, (k, v) in enumerate(result.kv):
        state.keys[layer][:, :, :longest] = k.to(dtype)
        state.values[layer][:, :, :longest] = v.to(dtype)
    rows = torch.arange(B, device=device)
    state.lengths = lengths
    state.last_state = result.states[rows, lengths - 1].to(dtype)
    return state, result.logits[rows, lengths - 1]


@torch.no_grad()
def recurrent_token_losses(model: Transformer, tokens: Tensor, targets: Tensor) -> Tensor:
    """(B, T) next-token losses under the exact recurrence (batched KV-cache decoding)."""
    B, T = tokens.shape
    state = DecodeState.empty(model, B, T, tokens.device, next(model.parameters()).dtype)
    losses = []
    for t in range(T):
        logits = decode_step(model, state, tokens[:, t])
        losses.append(F.cross_entropy(logits, targets[:, t], ignore_index=IGNORE_INDEX, reduction="none"))
    return torch.stack(losses, dim=1)


def sample(
    logits: Tensor,
    temperature: float,
    top_k: Optional[int],
    generator: Optional[torch.Generator],
    top_p: Optional[float] = None,
) -> Tensor:
    """Greedy at temperature 0, else softmax sampling at that temperature from the top-k logits,
    then from the smallest set of most likely tokens whose probability reaches top_p (the most
    likely token always stays)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def seeded_generator(seed: Optional[int], device: str | torch.device) -> Optional[torch.Generator]:
    """A random generator on `device` seeded with `seed`, or None (the global RNG) without a seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    prefill_mode: str = "exact",
    stop_tokens: Sequence[int] = (),
    seed: Optional[int] = None,
    *,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Stream generation for a batch of prompts with true recurrence.

    Yields (tokens, done) per step: the new token of every sequence (B,) and
    which sequences had already stopped before it (their token is meaningless).
    A sequence stops after emitting a stop token; the loop ends when all have.
    Sampling draws from `generator` when given (one stream over several calls), else from a
    generator seeded with `seed`, else from the global RNG.
    """
    device = model.rope_cos.device
    if generator is None:
        generator = seeded_generator(seed, device)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    state, logits = prefill(model, prompts, prefill_mode, max_len)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator, top_p)
        yield token, done.clone()
        done = done | torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = decode_step(model, state, token, active=~done)


def generate_tokens(
    model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs
) -> list[list[int]]:
    """Run `generate` to the end; each sequence's new tokens up to and including its stop token."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens, done in generate(model, prompts, max_new_tokens, **kwargs):
        for b, (t, d) in enumerate(zip(tokens.tolist(), done.tolist())):
            if not d:
                outputs[b].append(t)
    return outputs
