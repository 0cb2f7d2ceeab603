"""Settings changed at resume: the difference between a checkpoint's config.toml and the
current config, which changes apply and which are refused.

Applied: everything the trainer reads as it runs (steps, logging, evaluation, checkpointing,
parallelism, ...) and the optimizer's hyperparameters and LR schedule, which the trainer
re-applies over the restored optimizer state. Refused: what the checkpoint's states depend on
(`FIXED_AT_RESUME`). The global batch is kept when the world size changes (see `kept_global_batch`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from titan_lrt.checkpoint import read_marker

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FIXED_AT_RESUME = (
    "model.",  # the architecture and the tokenizer's vocabulary (not tokenizer_path: files move)
    "lrt.",
    "training.seq_len",
    "training.seed",
    "optimizer.name",
    "data.text_column",
    "data.packing",
    "data.num_streams",
)
"""Keys (or section prefixes) that a resumed run cannot change: the saved model, optimizer
and data-stream states only mean something under the values they were saved with."""

APPLIED_ANYWAY = (
    "model.tokenizer_path",
    # which optimizer steps refine: the states do not depend on it, so a run may change its schedule
    "lrt.refine_fraction",
    "lrt.start_step",
    "lrt.pass0_backward",
    "lrt.jacobi_mix",
    "lrt.warn_after_steps",  # a warning changes no state
)


def flat_settings(toml_text: str) -> dict[str, Any]:
    """{"section.key": value} of a config as TOML."""
    return {
        f"{section}.{key}": value
        for section, values in tomllib.loads(toml_text).items()
        for key, value in values.items()
    }


def settings_diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, current value) of every key whose value differs (None: absent)."""
    return {
        k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)
    }


def is_fixed(key: str) -> bool:
    if key in APPLIED_ANYWAY:
        return False
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in FIXED_AT_RESUME)


def refusal(diff: dict[str, tuple[Any, Any]]) -> str | None:
    """One line naming the first key that cannot change at resume, or None. A key only one side has
    (added or removed by a newer version of the code) is not a change the user made: shown, not refused."""
    fixed = [k for k, (old, new) in diff.items() if is_fixed(k) and old is not None and new is not None]
    if not fixed:
        return None
    key, (old, new) = fixed[0], diff[fixed[0]]
    more = f" (and {', '.join(fixed[1:])})" if len(fixed) > 1 else ""
    return (
        f"{key} changed at resume ({_show(old)} -> {_show(new)}){more}: the checkpoint's states depend on it; "
        f'set it back, or start a new run (another job.dump_folder, or checkpoint.load = "none")'
    )


def describe_diff(diff: dict[str, tuple[Any, Any]]) -> list[str]:
    """Console lines of the applied changes."""
    return [f"  {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in diff.items()]


def saved_world_size(step_folder: Path) -> int | None:
    try:
        return int(read_marker(step_folder)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolved_global_batch(settings: dict[str, Any], world_size: int) -> int:
    """Sequences per step of a run with these settings on `world_size` ranks (training.global_batch_size,
    or local_batch_size x data-parallel ranks when 0)."""
    explicit = settings.get("training.global_batch_size", 0)
    dp = world_size // max(settings.get("parallelism.context_parallel_degree", 1), 1)
    return explicit or settings["training.local_batch_size"] * dp


def kept_global_batch(
    saved: dict[str, Any], saved_world: int, current: dict[str, Any], current_global: int
) -> int | None:
    """The global batch a resume keeps: the checkpoint's, when the current config leaves it to the
    world size (global_batch_size = 0) and the world size or local batch changed; None otherwise."""
    if current.get("training.global_batch_size", 0):
        return None
    old = resolved_global_batch(saved, saved_world)
    return old if old != current_global else None


def _show(value: Any) -> str:
    return "(absent)" if value is None else json.dumps(value) if isinstance(value, str) else str(value)
