"""Loading a trained model for evaluation without the trainer: one device, no process group.

`load_model(path)` dispatches on what `path` is:

- a DCP step folder written by the trainer (`<dump>/checkpoints/step-N/`):
  the run's `config.toml` inside it rebuilds the model, DCP reads only the
  `model.<fqn>` keys (not the optimizer or loader states);
- a checkpoint folder holding step folders, or a run's dump folder holding
  `checkpoints/`: its newest complete step.

Another format (e.g. an exported safetensors file) is one more branch in
`load_model` returning the same `LoadedModel`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp

from titan_lrt.checkpoint import MARKER, MODEL, RUN_TOKENIZER, checkpoint_problem
from titan_lrt.config import Config, ConfigError, load_config
from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.model.transformer import Transformer

RUN_CONFIG = "config.toml"


@dataclass
class LoadedModel:
    model: Transformer
    """Plain module in eval mode, fp32 weights, on the requested device."""
    tokenizer: Tokenizer
    config: Config
    """The run's resolved config (seq_len, data, LRT settings, ...)."""
    step: Optional[int]
    """Training step of the checkpoint, when known."""
    path: Path
    """What was loaded (the step folder for a DCP checkpoint)."""


def load_model(
    path: str | Path, device: str | torch.device = "cpu", tokenizer_path: Optional[str | Path] = None
) -> LoadedModel:
    """Load a trained model; `tokenizer_path` overrides the run config's `model.tokenizer_path`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; give a checkpoint step folder (…/checkpoints/step-N)")
    if path.is_dir() and (path / ".metadata").exists():
        return load_dcp_step(path, device, tokenizer_path)
    if path.is_dir():
        return load_dcp_step(newest_step_folder(path), device, tokenizer_path)
    raise ValueError(
        f"{str(path)!r}: cannot load a model from this file; allowed: a DCP step folder (…/checkpoints/step-N), "
        "a checkpoint folder or a run folder holding checkpoints/"
    )


def newest_step_folder(folder: Path) -> Path:
    """The newest complete step folder in `folder` or in `folder/checkpoints`."""
    for candidate in (folder, folder / "checkpoints"):
        steps = sorted(p for p in candidate.glob("step-*") if p.is_dir() and checkpoint_problem(p) is None)
        if steps:
            return steps[-1]
    raise FileNotFoundError(
        f"{str(folder)!r} holds no complete checkpoint (no step-N folder in it or in its checkpoints/); "
        "give a checkpoint step folder"
    )


def load_dcp_step(
    path: Path, device: str | torch.device = "cpu", tokenizer_path: Optional[str | Path] = None
) -> LoadedModel:
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{str(path)!r} is not a complete checkpoint: {problem}")
    if not (path / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: no {RUN_CONFIG}; the trainer writes the run's config into every step folder")
    try:
        config, _ = load_config(["--config", str(path / RUN_CONFIG)])
    except ConfigError as err:
        raise ValueError(f"{path / RUN_CONFIG}: {err}") from None
    tokenizer = Tokenizer.from_file(_find_tokenizer(path, config, tokenizer_path))
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config.model_args(tokenizer.vocab_size, tokenizer.bos_id))
    model.to_empty(device=device)
    state = model.state_dict()
    _check_keys(path, state)
    dcp.load({MODEL: state}, checkpoint_id=str(path), no_dist=True)  # only the model's keys are read
    model.load_state_dict(state)
    model.init_buffers(device)
    model.eval()
    step = json.loads((path / MARKER).read_text()).get("step")
    return LoadedModel(model, tokenizer, config, step, path)


def _find_tokenizer(step_folder: Path, config: Config, override: Optional[str | Path]) -> Path:
    """The given tokenizer, else the run's `model.tokenizer_path`: as written (relative to the
    working directory), or relative to a folder above the checkpoint (the run's working directory)."""
    if override is not None:
        if not Path(override).is_file():
            raise FileNotFoundError(f"tokenizer {str(override)!r} does not exist")
        return Path(override)
    written = Path(config.model.tokenizer_path)
    run_copy = [p / RUN_TOKENIZER for p in step_folder.resolve().parents]  # the trainer's copy in job.dump_folder
    tried = [written] if written.is_absolute() else [written, *(p / written for p in step_folder.resolve().parents)]
    tried += run_copy
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the run's tokenizer model.tokenizer_path={str(written)!r} is not found (tried the working directory and "
        f"the folders above {step_folder}); give its path (--tokenizer)"
    )


def _check_keys(path: Path, state: dict) -> None:
    """Fail with the first differing key before reading any data."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    prefix = MODEL + "."
    saved = {k[len(prefix) :]: md for k, md in metadata.state_dict_metadata.items() if k.startswith(prefix)}
    for key, tensor in state.items():
        if key not in saved:
            raise ValueError(f"checkpoint {path} does not match its config: model key {key!r} is not in it")
        shape = tuple(getattr(saved[key], "size", ()))
        if shape != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint {path} does not match its config: {key!r} has shape {shape} there, "
                f"{tuple(tensor.shape)} in the model built from {RUN_CONFIG} (wrong tokenizer?)"
            )
    extra = sorted(set(saved) - set(state))
    if extra:
        raise ValueError(f"checkpoint {path} has model keys the model does not ({extra[:3]}, {len(extra)} in all)")
