"""Optimizers, learning-rate schedules and gradient clipping.

Parameters are split by role into four groups -- "matrix", "embedding", "head",
"scalar" -- by their names. Names survive FSDP2 (`fully_shard` swaps tensors for
DTensors in place) and are only prefixed by torch.compile and activation
checkpointing wrappers, which are stripped; identity or shape tricks would not
survive sharding. Each group gets its own learning rate and weight decay, and
with Muon the matrices get their own optimizer. The LRT pathway's parameters can
get a learning rate of their own (`optimizer.lrt_lr_scale`, see `is_pathway`).

Takes plain arguments so that the trainer's config sections map onto them one
to one (`optimizer.*` -> `build_optimizers`, `lr_scheduler.*` ->
`build_lr_schedulers`, `training.max_norm` -> `clip_grad_norm_`).
The builders' arguments are keyword-only and have no defaults: the config's
sections hold the only defaults, and the config checks every value when it is
loaded.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

GROUPS = ("matrix", "embedding", "head", "scalar")
_MUON_TAKES_MATRICES = {"adamw": False, "muon": True}
OPTIMIZERS = tuple(_MUON_TAKES_MATRICES)
_ADAMW_KERNELS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
IMPLEMENTATIONS = tuple(_ADAMW_KERNELS)
MUON_ADJUST_LR = ("original", "match_rms_adamw")
"""torch.optim.Muon's `adjust_lr_fn` values."""
_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "sqrt": lambda progress: 1.0 - math.sqrt(progress),
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}
DECAY_TYPES = tuple(_DECAY_SHAPES)

LR_REFERENCE_DIM = 768
"""Width at which nanochat tuned its AdamW learning rates; `dim_lr_scaling`
multiplies them by (dim / 768) ** -0.5."""

_RULES = (
    ("matrix", r"layers\.\d+\.attention\.(wq|wk|wv|wo|gate)\.weight"),
    ("matrix", r"layers\.\d+\.mlp\.(w1|w2)\.weight"),
    ("matrix", r"feedback\.proj\.weight"),
    ("embedding", r"tok_embeddings\.weight"),
    ("embedding", r"layers\.\d+\.attention\.value_embed\.weight"),
    ("head", r"lm_head\.weight"),
    ("scalar", r"layers\.\d+\.(resid_scale|x0_scale|gamma)"),
)
_WRAPPERS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

_PATHWAY = r"feedback\.proj\.weight|layers\.\d+\.gamma"
"""The LRT pathway's own parameters: the feedback projections and the injection scalars gamma.
The feedback gate rows are not among them: they share one matrix with the local (and
value-embedding) gate rows, which an optimizer cannot give another learning rate."""
PATHWAY_SUFFIX = "_pathway"
"""Param groups of the pathway's parameters are named <group>_pathway (`optimizer.lrt_lr_scale`)."""


def canonical_name(name: str) -> str:
    """The parameter's name in the bare `Transformer` (compile/AC wrapper segments removed)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def group_of(name: str) -> str:
    """The group of one parameter name; an unknown name is an error, so that a new
    parameter cannot silently get some other group's learning rate."""
    canonical = canonical_name(name)
    matches = [group for group, pattern in _RULES if re.fullmatch(pattern, canonical)]
    if len(matches) != 1:
        raise ValueError(
            f"parameter {name!r} matches {len(matches)} of the optimizer groups {GROUPS} (needs exactly one); "
            "add it to titan_lrt.optim._RULES"
        )
    return matches[0]


def is_pathway(name: str) -> bool:
    """Whether a parameter belongs to the LRT pathway (its canonical name matches `_PATHWAY`)."""
    return re.fullmatch(_PATHWAY, canonical_name(name)) is not None


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of `model` as (name, parameter), by group, in model order.

    Raises naming all parameters that match no group, and any "matrix"
    parameter that is not 2-D (Muon needs matrices).
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    unmatched = []
    for name, param in model.named_parameters():
        try:
            group = group_of(name)
        except ValueError:
            unmatched.append(name)
            continue
        if group == "matrix" and param.ndim != 2:
            raise ValueError(f"matrix parameter {name!r} has shape {tuple(param.shape)}; matrices must be 2-D")
        groups[group].append((name, param))
    if unmatched:
        raise ValueError(f"parameters in no optimizer group {GROUPS}: {unmatched}; add them to titan_lrt.optim._RULES")
    return groups


class OptimizersContainer:
    """The optimizers of one model, stepped together.

    `optimizers` is the plain list that
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, optimizers)`
    takes; `state_dict()` returns exactly that (flattened: keyed by parameter
    name, so it reshards under DCP), which makes the container itself a DCP
    `Stateful`. Every param group carries a "name" from `GROUPS` for logging.
    """

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("OptimizersContainer needs at least one optimizer")
        self.model = model
        self.optimizers = optimizers
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)
        self._create_states()

    def _create_states(self) -> None:
        """Give every parameter without state the state torch would create at its first gradient (zero
        moments, step 0), by one zero-LR step on zero gradients of those parameters alone, step counts
        reset after it. Parameters that skip steps (the LRT pathway on steps that run pass 0 alone) then
        have state in every checkpoint, so that a checkpoint's keys never depend on which parameters
        have had gradients. Parameters with state (an optimizer wrapped again) are left alone."""
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        lrs = [g["lr"] for g in groups]
        params = [p for g in groups for p in g["params"]]
        states = {id(p): opt.state for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        new = [p for p in params if not states[id(p)].get(p)]
        if not new:
            return
        grads = [p.grad for p in params]
        for g in groups:
            g["lr"] = 0.0
        for p in params:
            p.grad = None
        for p in new:
            p.grad = torch.zeros_like(p)
        self.step()
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
        for p in new:
            state = states[id(p)][p]
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    def __len__(self) -> int:
        return len(self.optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Every parameter's state, keyed by parameter name (see `_create_states`)."""
        return get_optimizer_state_dict(self.model, self.optimizers, options=self._options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizers, state_dict, options=self._options)


def build_optimizers(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    implementation: str,
    embedding_lr_mult: float,
    head_lr_mult: float,
    scalar_lr_mult: float,
    dim_lr_scaling: bool,
    muon_lr: float,
    muon_momentum: float,
    muon_nesterov: bool,
    muon_ns_steps: int,
    muon_adjust_lr: str,
    lrt_lr_scale: float,
) -> OptimizersContainer:
    """AdamW over all groups ("adamw"), or Muon for the matrices and AdamW for the rest ("muon").

    AdamW learning rates: `lr` for matrices, `lr * <group>_lr_mult` for the
    other groups, all times (dim / 768) ** -0.5 when `dim_lr_scaling` (nanochat's
    rule, dim read from the token embedding). `weight_decay` (decoupled) applies
    to the matrices only, in whichever optimizer holds them: embeddings, head and
    scalars are never decayed. `implementation` is AdamW's kernel.

    The config's defaults (matrices 0.01, embeddings 0.3, head 0.04, scalars 0.002) were
    the best of a sweep on the debug model (dim 64-128, a few hundred steps):
    one LR for all groups trains far slower, because the RMS-normed embeddings
    (init std 1) need large steps to move. Wider models want a lower `lr`.

    Muon (torch.optim.Muon): `muon_lr` for the matrices, scaled per matrix by
    `muon_adjust_lr` ("original": sqrt(max(1, rows/cols)); "match_rms_adamw":
    0.2 * sqrt(max(rows, cols))); `muon_momentum`, `muon_nesterov` and
    `muon_ns_steps` (Newton-Schulz iterations) as in Keller Jordan's Muon.

    `lrt_lr_scale` != 1 moves the LRT pathway's parameters (`is_pathway`) into groups of their
    own, "matrix_pathway" and "scalar_pathway", whose learning rate is their group's times
    `lrt_lr_scale` (same weight decay, same optimizer; the LR schedule scales every group alike).
    At 1 the groups are exactly those above.
    """
    # The values are checked where the config is loaded (titan_lrt.config: ranges and these tuples).
    muon = _MUON_TAKES_MATRICES[name.lower()]
    groups = parameter_groups(model)
    scale = 1.0
    if dim_lr_scaling:
        (dim,) = {p.shape[-1] for n, p in groups["embedding"] if canonical_name(n) == "tok_embeddings.weight"}
        scale = (dim / LR_REFERENCE_DIM) ** -0.5
    mults = {"matrix": 1.0, "embedding": embedding_lr_mult, "head": head_lr_mult, "scalar": scalar_lr_mult}

    def group(g: str, lr: float) -> list[dict[str, Any]]:
        """Group g's param group(s): its pathway parameters apart when they get another LR."""
        decay = weight_decay if g == "matrix" else 0.0
        split = lrt_lr_scale != 1.0
        parts = {
            g: [p for n, p in groups[g] if not (split and is_pathway(n))],
            g + PATHWAY_SUFFIX: [p for n, p in groups[g] if split and is_pathway(n)],
        }
        return [
            {"name": name, "params": params, "lr": lr * (lrt_lr_scale if name != g else 1.0), "weight_decay": decay}
            for name, params in parts.items()
            if params
        ]

    adam_names = [g for g in GROUPS if groups[g] and not (muon and g == "matrix")]
    kernel = _ADAMW_KERNELS[implementation]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(
            [pg for g in adam_names for pg in group(g, lr * mults[g] * scale)], betas=(beta1, beta2), eps=eps, **kernel
        )
    ]
    if muon:
        optimizers.append(
            torch.optim.Muon(
                group("matrix", muon_lr),
                momentum=muon_momentum,
                nesterov=muon_nesterov,
                ns_steps=muon_ns_steps,
                adjust_lr_fn=muon_adjust_lr,
            )
        )
    return OptimizersContainer(model, optimizers)


def lr_factor(
    step: int, steps: int, warmup_steps: int, decay_steps: int, decay_type: str, min_lr_factor: float
) -> float:
    """Multiplier of the peak LR for the update with 0-based index `step`.

    Warmup: (step + 1) / (warmup_steps + 1), so the first update is not wasted
    at lr 0 and the line reaches 1 at step `warmup_steps`. Then 1. Over the last
    `decay_steps` updates the shape falls from 1 towards `min_lr_factor`, which
    it reaches one step after the run (no update at lr 0 either); with
    decay_steps = 0 the LR stays at the peak.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_start = steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return 1.0
    progress = min(step - decay_start + 1, decay_steps + 1) / (decay_steps + 1)
    return min_lr_factor + (1.0 - min_lr_factor) * _DECAY_SHAPES[decay_type](progress)


def decay_steps_of(steps: int, warmup_steps: int, decay_ratio: float | None) -> int:
    """round(steps * decay_ratio); None decays over every step after the warmup (torchtitan)."""
    return steps - warmup_steps if decay_ratio is None else round(steps * decay_ratio)


class LRSchedulersContainer:
    """One LambdaLR per optimizer, all on the same factor, stepped together.

    The state keeps every scheduler's own state (their base LRs differ between
    the AdamW and Muon optimizers, so one cannot stand in for the others).
    """

    def __init__(self, optimizers: OptimizersContainer, factor: Callable[[int], float]):
        self.schedulers = [LambdaLR(opt, factor) for opt in optimizers]

    def __iter__(self) -> Iterator[LambdaLR]:
        return iter(self.schedulers)

    def __len__(self) -> int:
        return len(self.schedulers)

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def last_lr(self) -> dict[str, float]:
        """Current LR of every param group, by group name."""
        return {
            group["name"]: float(lr)
            for scheduler in self.schedulers
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr())
        }

    def state_dict(self) -> dict[str, Any]:
        return {str(i): scheduler.state_dict() for i, scheduler in enumerate(self.schedulers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict) != len(self.schedulers):
            raise ValueError(
                f"LR scheduler state has {len(state_dict)} schedulers, this run has {len(self.schedulers)} "
                "(was optimizer.name changed?)"
            )
        for i, scheduler in enumerate(self.schedulers):
            scheduler.load_state_dict(state_dict[str(i)])


def build_lr_schedulers(
    optimizers: OptimizersContainer,
    *,
    steps: int,
    warmup_steps: int,
    decay_ratio: float | None,
    decay_type: str,
    min_lr_factor: float,
) -> LRSchedulersContainer:
    """Linear warmup, constant, then decay over the last `decay_ratio` of `steps`
    (warmup-stable-decay); see `lr_factor` for the exact values.

    decay_ratio=None decays over all steps after the warmup, 0 never decays.
    Call `step()` once after each optimizer step; the schedule's shape comes
    from these arguments, not from a loaded state (which restores the step).
    """
    # Each value's range and choice is checked where the config is loaded; here what they need together.
    decay_steps = decay_steps_of(steps, warmup_steps, decay_ratio)
    if decay_steps < 0 or warmup_steps + decay_steps > steps:
        raise ValueError(
            f"lr_scheduler.warmup_steps={warmup_steps} plus {max(decay_steps, 0)} decay steps "
            f"(decay_ratio={decay_ratio} of training.steps={steps}) exceed training.steps={steps}"
        )

    def factor(step: int) -> float:
        return lr_factor(step, steps, warmup_steps, decay_steps, decay_type, min_lr_factor)

    return LRSchedulersContainer(optimizers, factor)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale the gradients so that their total norm is at most `max_norm` (0: only
    measure); return the total norm before clipping.

    With DTensor gradients (FSDP2) the per-shard norms form a partial DTensor;
    `full_tensor()` reduces it over the mesh, so every rank clips by, and
    returns, the same global norm. A non-finite norm is returned as is; the
    caller decides to stop or skip the step.
    """
    if not max_norm >= 0:
        raise ValueError(f"training.max_norm={max_norm} must be >= 0 (0 disables clipping)")
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
