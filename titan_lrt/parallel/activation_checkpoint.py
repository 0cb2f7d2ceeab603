"""Activation checkpointing of blocks: none, full, or selective.

Each pass calls a block separately, so each pass's activations are recomputed
from that pass's own inputs in its backward; the pass-0 keys and values that
the subset passes read are outputs of pass 0's blocks and stay alive as such,
so checkpointing never recomputes the shared buffer differently.

- "full": every block keeps only its inputs and recomputes the rest.
- "selective" with option "N": every N-th block is checkpointed.
- "selective" with option "op": every block saves the outputs of its matmuls
  and attention kernels and recomputes the cheap element-wise work.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan_lrt.model.transformer import Transformer

_WRAPS = {"none": False, "full": True, "selective": True}
MODES = tuple(_WRAPS)
"""activation_checkpoint.mode (see the module docstring)."""

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.higher_order.flex_attention,  # FlexAttention (CUDA's default attention)
}


def _save_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_every(selective_option: str) -> int | None:
    """The N of selective option "N" (checkpoint every N-th block); None for "op" (every block,
    saving matmul and attention outputs). The config checks the option with this when it loads."""
    if selective_option == "op":
        return None
    try:
        every = int(selective_option)
    except ValueError:
        every = 0
    if every < 1:
        raise ValueError(
            f'activation_checkpoint.selective_ac_option={selective_option!r}: allowed "op" or a '
            "positive integer N (checkpoint every N-th block)"
        )
    return every


def apply_activation_checkpointing(model: Transformer, *, mode: str, selective_option: str) -> None:
    """Wrap blocks in place (before compile and FSDP)."""
    if not _WRAPS[mode]:
        return
    every, context_fn = 1, None
    if mode == "selective":
        n = selective_every(selective_option)
        if n is None:
            context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
        else:
            every = n
    for i, block in enumerate(model.layers):
        if i % every == 0:
            kwargs = {"context_fn": context_fn} if context_fn is not None else {}
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
