"""torch.compile per block (and the LM head with its loss).

Each block is compiled on its own with static shapes: one graph serves every
layer of the same kind (window, gates, injection), and each pass kind -- the
full pass, the subset pass of each group i, the decode step, with and without
gradients -- gets its own graph once, so steps after the first compile nothing
(tests count the recompiles). The recompile limit is sized from these counts:
nanochat's "SSSL" windows with alternating value embeddings make several block
kinds, which the default limit of 8 graphs per function cannot hold.
"""

from __future__ import annotations

import torch
import torch._dynamo

from titan_lrt.model.transformer import Transformer

EXTRA_GRAPHS = 4
"""Graphs a pass kind may need beyond the training and evaluation passes: schedule
evaluation over other lengths, prefill of other prompt lengths."""


def block_kinds(model: Transformer) -> int:
    """Distinct blocks as Dynamo sees them: layers differ in window, gates (feedback,
    value embedding) and residual injection, and each difference is a guard."""
    kinds = set()
    for block in model.layers:
        block = getattr(block, "_checkpoint_wrapped_module", block)
        kinds.add((block.attention.window, block.attention.gate_names, block.gamma is not None))
    return len(kinds)


def graphs_per_code(model: Transformer) -> int:
    """Graphs one compiled function may need: every block kind x pass kind, in training
    (with gradients) and in evaluation (without), plus the decode step and EXTRA_GRAPHS."""
    return block_kinds(model) * (2 * model.args.lrt.pass_shapes + 1 + EXTRA_GRAPHS)


def apply_compile(model: Transformer, backend: str = "inductor") -> None:
    """Compile every block, the LM head and the feedback projection in place (after
    float8 converts the linears, before FSDP wraps them). backend: torch.compile's
    ("aot_eager" traces without code generation, for fast tests of graph counts)."""
    limit = graphs_per_code(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, limit * (len(model.layers) + 2)
    )
    for block in model.layers:
        block.compile(backend=backend, dynamic=False, fullgraph=True)
    model.lm_head.compile(backend=backend, dynamic=False, fullgraph=True)
    compile_feedback(model, backend)


def compile_feedback(model: Transformer, backend: str) -> None:
    """Compile the feedback projection's matmul (a float8 linear's casts fuse with it).

    The compiled unit is `FeedbackProjection.project`, whose output is one fresh tensor; the per-layer
    (W_K m, W_V m) views of it are taken outside. Compiling `FeedbackProjection.forward`
    itself, whose outputs are all views of one matmul, crashes AOT autograd's alias
    replay under inductor in torch 2.13 (a view rebuilt with garbage sizes: "shape
    '[94645037742460, ...]' is invalid for input of size 4096")."""
    if model.feedback is not None:
        feedback = model.feedback
        feedback.project = torch.compile(feedback.project, backend=backend, dynamic=False, fullgraph=True)
