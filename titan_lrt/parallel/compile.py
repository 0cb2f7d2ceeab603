"""torch.compile per block (and the LM head with its loss, and the feedback projection).

Each block is compiled on its own with static shapes: one graph serves every
layer, and each pass kind -- the full pass, the subset pass of each group i,
the decode step -- gets its own graph once, so steps after the first compile
nothing (tests count the recompiles).
"""

from __future__ import annotations

import torch
import torch._dynamo

from titan_lrt.model.transformer import Transformer

EXTRA_GRAPHS = 4
"""Graphs a block may need beyond the training passes: decode, zero-memory and
schedule evaluation passes of other lengths."""


def apply_compile(model: Transformer) -> None:
    """Compile every block and the LM head in place (before FSDP wraps them)."""
    lrt = model.args.lrt
    passes = 1 + (lrt.num_subsets if lrt.mode == "interleaved" else 0) + (1 if lrt.mode == "jacobi" else 0)
    limit = passes + EXTRA_GRAPHS
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for block in model.layers:
        block.compile(dynamic=False, fullgraph=True)
    model.lm_head.compile(dynamic=False, fullgraph=True)
    if model.feedback is not None:
        model.feedback.compile(dynamic=False, fullgraph=True)
