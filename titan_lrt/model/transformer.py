"""The LRT transformer: embeddings, blocks, feedback projections, LM head.

`Transformer.forward` runs one pass over some positions of a batch: the full
pass (all positions, causal), a subset pass (a position subset against the
shared buffer) or a decode step (one token against a KV cache). The memory
m_t, when given, is already shifted and reset by the caller (see
`titan_lrt.model.memory`); None means zero memory, and the zero feedback is
then skipped rather than computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from titan_lrt.model.args import ModelArgs
from titan_lrt.model.attention import BlockMasks, MaskKey, uses_flex
from titan_lrt.model.block import Block, CacheKeys, Keys, LayerKV, Memory, SubsetKeys
from titan_lrt.model.layers import init_uniform_, rms_norm, rope_tables

IGNORE_INDEX = -100
"""Targets with this value are not scored."""


@dataclass
class PassOutput:
    """What one pass computes at its positions (B sequences, n positions)."""

    states: Tensor
    """(B, n, dim) source states s_t: the RMS-normed output of the source block."""

    kv: list[LayerKV]
    """Fresh keys/values of every layer."""

    gate_means: list[Optional[Tensor]]
    """Per layer, the detached mean of each gate (None for layers without gates)."""

    logits: Optional[Tensor] = None
    """(B, n, vocab) soft-capped fp32 logits, when no targets were given."""

    token_loss: Optional[Tensor] = None
    """(B, n) fp32 cross-entropy per position (0 where the target is ignored)."""


class FeedbackProjection(nn.Module):
    """W_K m and W_V m for every injected layer, as one matmul.

    "shared" holds one (W_K, W_V) pair used by all layers, computed once per
    pass; "layerwise" holds one pair per injected layer, stacked into a single
    weight so that the whole projection is still one matmul.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = args.injected_layers()
        self.shared = args.lrt.projection == "shared"
        self.n_kv_heads, self.head_dim, self.dim = args.kv_heads, args.head_dim, args.dim
        n_pairs = 1 if self.shared else len(self.layers)
        self.proj = nn.Linear(args.dim, n_pairs * 2 * args.kv_dim, bias=False)
        # lrt.gate_warmup_steps: r * W m, r a 0-dim tensor that the owner sets (a Python float
        # would be a constant to torch.compile: a recompile per value)
        self.ramped = args.lrt.gate_warmup_steps > 0
        self.register_buffer("ramp", torch.ones(()), persistent=False)

    def forward(self, memory: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """memory (B, n, dim) -> {layer: (k_fb, v_fb)} with shapes (B, n, Hkv, D)."""
        B, n, _ = memory.shape
        kv = self.project(memory)
        if self.ramped:
            kv = kv * self.ramp
        kv = kv.view(B, n, -1, 2, self.n_kv_heads, self.head_dim)
        if self.shared:
            pair = (kv[:, :, 0, 0], kv[:, :, 0, 1])
            return {layer: pair for layer in self.layers}
        return {layer: (kv[:, :, i, 0], kv[:, :, i, 1]) for i, layer in enumerate(self.layers)}

    def project(self, memory: Tensor) -> Tensor:
        """The one matmul (B, n, dim) -> (B, n, pairs * 2 * kv_dim): the unit
        `titan_lrt.parallel.compile` compiles (one fresh output, no views)."""
        return self.proj(memory)

    @torch.no_grad()
    def init_weights(self) -> None:
        init_uniform_(self.proj.weight, self.dim)  # like the attention's V projection


class LMHead(nn.Module):
    """Logits (soft-capped, fp32) or, given targets, the per-position cross-entropy.

    One module, so that it is one FSDP unit (with the final norm, which has no
    weights) and can be compiled with the loss.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.vocab_size, self.softcap, self.init_std = args.vocab_size, args.logit_softcap, args.head_init_std
        self.weight = nn.Parameter(torch.empty(args.padded_vocab_size, args.dim))

    def forward(self, h: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        logits = F.linear(h, self.weight)[..., : self.vocab_size]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.softcap > 0:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return loss.view(targets.shape)

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, args.dim)
        lrt = args.lrt
        self.feedback = FeedbackProjection(args) if lrt.enabled and lrt.kv_feedback else None
        self.layers = nn.ModuleList(Block(args, layer) for layer in range(args.n_layers))
        self.lm_head = LMHead(args)
        self.injected = frozenset(args.injected_layers())
        self.source_layer = args.source_layer_index
        cos, sin = rope_tables(args.max_seq_len, args.head_dim, args.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("gamma_ramp", torch.ones(()), persistent=False)
        self.block_masks = BlockMasks()
        self.training_step: Optional[int] = 0
        """Optimizer steps the weights have seen, which set the warmup ramps (`set_training_step`)."""
        self.set_training_step(0)

    @torch.no_grad()
    def init_buffers(self, device: Optional[torch.device] = None) -> None:
        """Compute the RoPE tables and the warmup ramps of `training_step` (not saved in checkpoints)."""
        device = device or self.rope_cos.device
        self.rope_cos, self.rope_sin = rope_tables(
            self.args.max_seq_len, self.args.head_dim, self.args.rope_base, device
        )
        self.gamma_ramp = torch.ones((), dtype=self.gamma_ramp.dtype, device=device)
        if self.feedback is not None:
            self.feedback.ramp = torch.ones((), dtype=self.feedback.ramp.dtype, device=device)
        self.set_training_step(self.training_step)

    @torch.no_grad()
    def set_training_step(self, step: Optional[int]) -> None:
        """Set the pathway's warmup ramps (`LRTArgs.ramps`) to those of weights after `step`
        optimizer steps (None: unknown, fully on). The trainer calls it before every step and
        evaluation; loading a checkpoint or an export sets its step. In place: compiled code
        reads the new values without recompiling."""
        self.training_step = step
        if self.rope_cos.is_meta:  # built on the meta device: init_buffers sets them
            return
        gamma, feedback = self.args.lrt.ramps(step)
        self.gamma_ramp.fill_(gamma)
        if self.feedback is not None:
            self.feedback.ramp.fill_(feedback)

    @torch.no_grad()
    def init_weights(self, buffer_device: Optional[torch.device] = None) -> None:
        """Initialise every parameter and buffer (also after building on the meta device)."""
        self.init_buffers(buffer_device)
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        self.lm_head.init_weights()
        for layer in self.layers:
            layer.init_weights()
        if self.feedback is not None:
            self.feedback.init_weights()

    def forward(
        self,
        tokens: Tensor,
        targets: Optional[Tensor] = None,
        *,
        positions: Optional[Tensor] = None,
        memory: Optional[Tensor] = None,
        keys: Optional[Sequence[Keys]] = None,
    ) -> PassOutput:
        """One pass.

        tokens: (B, n) token ids at the pass's positions.
        targets: (B, n) next-token ids; given, the pass returns per-position
            losses instead of logits.
        positions: (n,) or (B, n) absolute positions (default: 0..n-1).
        memory: (B, n, dim) memory m_t at these positions (None: zero memory).
        keys: per layer, what the queries attend to (None: full causal pass).
        """
        B, n = tokens.shape
        if positions is None:
            positions = torch.arange(n, device=tokens.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x0 = rms_norm(self.tok_embeddings(tokens))
        x = x0.clone()  # not an alias of x0: every layer sees the same input structure (one compiled graph)
        feedback = self.feedback(memory) if memory is not None and self.feedback is not None else {}
        masks = self.layer_block_masks(keys, n, tokens.device, _compute_dtype(x0))

        states, kvs, gate_means = None, [], []
        for i, layer in enumerate(self.layers):
            layer_memory = None
            if memory is not None and i in self.injected:
                layer_memory = Memory(memory, *feedback.get(i, (None, None)), self.gamma_ramp)
            out = layer(x, x0, tokens, cos, sin, layer_memory, None if keys is None else keys[i], masks[i])
            x = out.x
            kvs.append(out.kv)
            gate_means.append(out.gate_means)
            if i == self.source_layer:
                states = rms_norm(x)
        h = states if self.source_layer == len(self.layers) - 1 else rms_norm(x)
        if targets is None:
            return PassOutput(states, kvs, gate_means, logits=self.lm_head(h))
        return PassOutput(states, kvs, gate_means, token_loss=self.lm_head(h, targets))

    def layer_block_masks(self, keys: Optional[Sequence[Keys]], n: int, device: torch.device, dtype: torch.dtype):
        """Per layer, the FlexAttention block mask of its attention in a pass of n queries
        (None where it takes no FlexAttention), from `self.block_masks`: built once per
        shape here, outside the compiled blocks, never per block call."""
        masks = []
        for i in range(len(self.layers)):
            window = self.args.window(i)
            key = _mask_key(None if keys is None else keys[i], n, window)
            use = key is not None and uses_flex(key[0], self.args.attention_backend, window, device, dtype)
            masks.append(self.block_masks.get(key, device) if use else None)
        return masks


def _mask_key(keys: Keys, n: int, window: int) -> Optional[MaskKey]:
    """The block-mask shape of a layer's attention over `keys` (None: a decode step)."""
    if keys is None:
        return ("causal", n, window)
    if isinstance(keys, SubsetKeys):
        n_kv = n + sum(k.size(2) for k in keys.keys if k is not None)
        return ("subset", n, n_kv, len(keys.keys), keys.index, window)
    if isinstance(keys, CacheKeys):
        return None
    return ("context", keys.query_runs, keys.key_count, window)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention's queries will have: autocast's, else that of the activations."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
