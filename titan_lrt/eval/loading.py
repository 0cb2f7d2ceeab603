"""Loading a trained model for evaluation without the trainer: one device, no process group.

`load_model(path)` takes any form `titan_lrt.export.read_model_files` reads: a
DCP step folder written by the trainer (its config.toml rebuilds the model and
only the `model.*` keys are read), a checkpoint folder or a run's dump folder
(its newest complete step), an exported safetensors folder or torch file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from titan_lrt.config import Config
from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.export import read_model_files
from titan_lrt.model.transformer import Transformer


@dataclass
class LoadedModel:
    model: Transformer
    """Plain module in eval mode, with the saved weights, on the requested device."""
    tokenizer: Tokenizer
    config: Config
    """The run's resolved config (seq_len, data, LRT settings, ...); for an exported model,
    the defaults with its model arguments."""
    step: Optional[int]
    """Training step of the checkpoint, when known."""
    path: Path
    """What was loaded (the step folder for a DCP checkpoint)."""


def load_model(
    path: str | Path, device: str | torch.device = "cpu", tokenizer_path: Optional[str | Path] = None
) -> LoadedModel:
    files = read_model_files(path, tokenizer_path)
    return LoadedModel(
        files.build_model(device), files.tokenizer(), files.training_config(), files.step, Path(files.source)
    )
