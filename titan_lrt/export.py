"""Trained models outside the trainer: export a DCP checkpoint, convert it back, load it for use.

A trainer checkpoint holds the model next to the optimizer, data-loader and RNG
states, possibly sharded over ranks, and needs the run's config.toml and
tokenizer to be rebuilt. Export keeps what evaluation and generation need, in
one of two self-describing forms:

    <folder>/model.safetensors   the weights, named by module path (no "model." prefix)
    <folder>/config.json         the model arguments (ModelArgs, the LRT pathway included)
    <folder>/tokenizer.json      a copy of the run's tokenizer

    <file>.pt                    torch.save({"config": <config.json>, "state_dict": ..., "tokenizer": <its JSON text>})

Either converts back into a model-only DCP folder that a new run takes as
`checkpoint.initial_load_path`. Every direction copies the tensors as they are:
same names, shapes, dtypes and bits.

`load_model` is the one way to load a trained model for use (evaluation,
generation); `read_model_files` the one reader of every form (conversion).
Reading an exported folder unpickles nothing (safetensors and JSON); the torch
file is read with `torch.load(weights_only=True)`; a DCP checkpoint through the
restricted readers of `titan_lrt.checkpoint`, after its checksums matched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan_lrt.checkpoint import (
    METADATA,
    MODEL,
    RUN_CONFIG,
    RUN_TOKENIZER,
    check_model_keys,
    checkpoint_problem,
    load_dcp,
    read_marker,
    read_metadata,
    saved_model_shapes,
    step_folders,
    write_marker,
)
from titan_lrt.config import MODEL_OVERRIDES, Config, ConfigError, load_config
from titan_lrt.data.tokenizer import Tokenizer
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.transformer import Transformer

logger = logging.getLogger(__name__)

FORMAT = "titan_lrt"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ModelFiles:
    """A trained model as data: weights, arguments and tokenizer, in memory."""

    state_dict: dict[str, Tensor]
    """Weights by module path, exactly as `Transformer.state_dict()` names them."""
    args: ModelArgs
    tokenizer_json: str
    """The tokenizer.json text."""
    bos_token: str
    """The document-start token (the model's `bos_token_id`)."""
    source: str = ""
    """Where the weights came from (for people reading config.json)."""
    step: int | None = None
    """Training step of the weights (a DCP checkpoint's, or the one an export recorded; None when
    unknown). It sets the LRT warmup ramps (`Transformer.set_training_step`)."""
    run_config: Config | None = None
    """The run's resolved config, for a DCP checkpoint (seq_len, data, ... as trained)."""

    def training_config(self) -> Config:
        """The run's config, or for an exported model a default config with this model's
        arguments (what evaluation needs: model, lrt, training.seq_len)."""
        return self.run_config if self.run_config is not None else model_config(self.args, self.source)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(tokenizers.Tokenizer.from_str(self.tokenizer_json), bos_token=self.bos_token, name=self.source)

    def build_model(self, device: str | torch.device = "cpu") -> Transformer:
        """The model in eval mode, with these weights (no copy on the CPU)."""
        with torch.device("meta"):
            model = Transformer(self.args)
        check_model_keys(self.source, _shapes(model.state_dict()), _shapes(self.state_dict))
        model.load_state_dict(self.state_dict, strict=True, assign=True)
        model.training_step = self.step  # the LRT warmup ramps the weights were trained with
        model.init_buffers(torch.device(device))
        return model.to(device).eval()

    def config(self) -> dict[str, Any]:
        """The content of config.json."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_args": dataclasses.asdict(self.args),
            "bos_token": self.bos_token,
            "source": self.source,
            "step": self.step,
        }


# ---- reading ------------------------------------------------------------------------------


def read_model_files(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> ModelFiles:
    """Read any model form: a DCP checkpoint (step folder, checkpoints folder or dump folder),
    an exported folder or an exported torch file.

    tokenizer_path: for a DCP checkpoint whose run tokenizer is not where its config says.
    """
    path = Path(path)
    if path.is_file() or (path / WEIGHTS_FILE).is_file():
        if tokenizer_path is not None:
            raise ValueError(
                f"{path} is an exported model and carries its own tokenizer; a tokenizer path "
                "applies only to DCP checkpoints"
            )
        return read_exported(path)
    return read_checkpoint(path, tokenizer_path)


def read_exported(path: str | os.PathLike) -> ModelFiles:
    """Read an exported folder (model.safetensors, config.json, tokenizer.json) or torch file."""
    path = Path(path)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or set(saved) != {"config", "state_dict", "tokenizer"}:
            raise ValueError(
                f"{path} is not an exported titan_lrt torch file: expected a dict with keys "
                f"config, state_dict, tokenizer; got {_describe_keys(saved)}"
            )
        config, state_dict, tokenizer_json = saved["config"], saved["state_dict"], saved["tokenizer"]
    elif path.is_dir():
        missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, RUN_TOKENIZER) if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not an exported model folder: {', '.join(missing)} missing")
        config = json.loads((path / CONFIG_FILE).read_text())
        state_dict = load_file(path / WEIGHTS_FILE)
        tokenizer_json = (path / RUN_TOKENIZER).read_text()
    else:
        raise FileNotFoundError(f"exported model {str(path)!r} does not exist")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: config format {config.get('format')!r} version {config.get('format_version')!r}; "
            f"this code reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return ModelFiles(
        state_dict=state_dict,
        args=model_args_from_dict(config["model_args"]),
        tokenizer_json=tokenizer_json,
        bos_token=config["bos_token"],
        source=str(path),
        step=config.get("step"),  # exports before it was recorded: unknown
    )


def read_checkpoint(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> ModelFiles:
    """Read the model of a DCP checkpoint; the model arguments come from the run's config.toml
    in the step folder and the tokenizer (see `checkpoint_tokenizer`). Only the `model.*`
    keys are read, not the optimizer or data-loader states."""
    folder = find_checkpoint(path)
    config_file = folder / RUN_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no {RUN_CONFIG}: cannot tell the model's arguments "
            "(the trainer writes the run's config into every step folder)"
        )
    try:
        config, _ = load_config(["--config", str(config_file)])
    except ConfigError as err:
        raise ValueError(f"{config_file}: {err}") from None
    tokenizer_file = checkpoint_tokenizer(folder, config, tokenizer_path)
    tokenizer = Tokenizer.from_file(tokenizer_file)
    args = config.model_args(tokenizer.vocab_size, tokenizer.bos_id)
    with torch.device("meta"):
        expected = _shapes(Transformer(args).state_dict())
    metadata = read_metadata(folder)
    check_model_keys(f"checkpoint {folder} (against its {RUN_CONFIG})", expected, saved_model_shapes(metadata))
    files = ModelFiles(
        state_dict=_read_dcp_model(folder, metadata),
        args=args,
        tokenizer_json=tokenizer_file.read_text(),
        bos_token=tokenizer.bos_token,
        source=str(folder),
        step=read_marker(folder)["step"],
        run_config=config,
    )
    check_model_keys(str(folder), expected, _shapes(files.state_dict))
    return files


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A loadable DCP step folder: `path` itself, else the newest one in `path` or `path/checkpoints`
    (newer ones that fail their checks are skipped with a warning)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {str(path)!r}: it does not exist; give a checkpoint step folder "
            "(…/checkpoints/step-N), a run folder, or an exported model"
        )
    if (path / METADATA).is_file():
        problem = checkpoint_problem(path, verify=True)
        if problem is not None:
            raise ValueError(f"{path} is not a complete checkpoint: {problem}")
        return path
    for folder in (path, path / "checkpoints"):
        for _, step_folder in step_folders(folder):  # newest first
            problem = checkpoint_problem(step_folder, verify=True)
            if problem is None:
                return step_folder
            logger.warning("skipping %s: %s", step_folder, problem)
    raise FileNotFoundError(
        f"{str(path)!r} holds no complete checkpoint or exported model: expected a DCP step folder (with {METADATA}), "
        "a folder holding complete step-N folders (a run's checkpoints/ or its dump folder), an exported folder "
        f"with {WEIGHTS_FILE}, or an exported torch file"
    )


def checkpoint_tokenizer(folder: Path, config: Config, tokenizer_path: str | os.PathLike | None) -> Path:
    """The tokenizer of a checkpoint: the given path; else a tokenizer.json in the step folder
    (converted checkpoints carry one); else the run's model.tokenizer_path as written (relative
    to the working directory) or relative to a folder above the checkpoint (the run's working
    directory); else the copy the trainer keeps in its dump folder."""
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"tokenizer {str(tokenizer_path)!r} does not exist")
        return Path(tokenizer_path)
    written = Path(config.model.tokenizer_path)
    above = folder.resolve().parents
    candidates = [folder / RUN_TOKENIZER, written]
    if not written.is_absolute():
        candidates += [p / written for p in above]
    candidates += [p / RUN_TOKENIZER for p in above]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no tokenizer for checkpoint {folder}: the run's model.tokenizer_path={str(written)!r} is not found "
        "(tried the working directory, the folders above the checkpoint and the run folder's copy); "
        "give the run's tokenizer.json (--tokenizer PATH)"
    )


def model_args_from_dict(values: dict[str, Any]) -> ModelArgs:
    """ModelArgs from config.json's "model_args" (unknown keys are an error, missing ones take defaults)."""
    values = dict(values)
    lrt = dict(values.pop("lrt", {}))
    for cls, given in ((ModelArgs, values), (LRTArgs, lrt)):
        allowed = {f.name for f in dataclasses.fields(cls)} - {"lrt"}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise ValueError(f"config.json: unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(allowed)}")
    return ModelArgs(**values, lrt=LRTArgs(**lrt))


# ---- writing ------------------------------------------------------------------------------


def write_exported_folder(files: ModelFiles, folder: str | os.PathLike) -> Path:
    """Write model.safetensors, config.json and tokenizer.json into a new folder."""
    folder = _new_output(folder, is_dir=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(files.state_dict, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(files.config(), indent=2) + "\n")
    (folder / RUN_TOKENIZER).write_text(files.tokenizer_json)
    return folder


def write_torch_file(files: ModelFiles, path: str | os.PathLike) -> Path:
    """torch.save one dict: config (as in config.json), state_dict and the tokenizer's JSON text."""
    path = _new_output(path, is_dir=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": files.config(), "state_dict": files.state_dict, "tokenizer": files.tokenizer_json}, path)
    return path


def write_checkpoint(files: ModelFiles, folder: str | os.PathLike) -> Path:
    """A model-only DCP checkpoint folder, complete in the trainer's sense (usable as
    `checkpoint.initial_load_path` or read back by `read_checkpoint`).

    It holds the model under the trainer's keys (`model.<fqn>`), a tokenizer.json, and a
    config.toml whose [model], [lrt] and training.seq_len rebuild exactly these model
    arguments; the completion marker is written last.
    """
    folder = _new_output(folder, is_dir=True)
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save({MODEL: dict(files.state_dict)}, checkpoint_id=str(folder), no_dist=True)
    tokenizer_file = folder / RUN_TOKENIZER
    tokenizer_file.write_text(files.tokenizer_json)
    config = model_config(files.args, files.source)
    config.model.tokenizer_path = str(tokenizer_file.resolve())
    (folder / RUN_CONFIG).write_text(config.to_toml())
    # the step sets the LRT warmup ramps when the folder is read back (a run that starts
    # from it with initial_load_path counts its own steps from 0)
    write_marker(folder, step=files.step or 0, world_size=1)
    return folder


# ---- loading for use ----------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A trained model ready for use on one device (no process group)."""

    model: Transformer
    """Plain module in eval mode, with the saved weights, on the requested device (`model.args`)."""
    tokenizer: Tokenizer
    config: Config
    """The run's resolved config (seq_len, data, LRT settings, ...); for an exported model,
    the defaults with its model arguments."""
    step: int | None
    """Training step of the checkpoint, when known."""
    path: Path
    """What was loaded (the step folder for a DCP checkpoint)."""


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer_path: str | os.PathLike | None = None
) -> LoadedModel:
    """Any form `read_model_files` reads, as a model in eval mode with its tokenizer and config
    (what evaluation and generation use)."""
    files = read_model_files(path, tokenizer_path)
    return LoadedModel(
        files.build_model(device), files.tokenizer(), files.training_config(), files.step, Path(files.source)
    )


# ---- internals ----------------------------------------------------------------------------


def _read_dcp_model(folder: Path, metadata: Any) -> dict[str, Tensor]:
    """The `model.*` tensors of a DCP checkpoint, in their saved dtypes (the rest is not read)."""
    prefix = MODEL + "."
    state = {
        key[len(prefix) :]: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }
    if not state:
        names = sorted({key.split(".")[0] for key in metadata.state_dict_metadata})
        raise ValueError(f"checkpoint {folder} holds no model weights ({MODEL}.*); it holds: {', '.join(names)}")
    load_dcp({MODEL: state}, folder, no_dist=True)
    return state


def _shapes(state_dict: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


def model_config(args: ModelArgs, source: str) -> Config:
    """A config whose `Config.model_args(vocab_size, bos)` gives back exactly `args`."""
    config = Config()
    config.job.description = f"converted from {source}"
    config.model.vocab_size = args.vocab_size
    config.model.overrides = {name: getattr(args, name) for name in MODEL_OVERRIDES}
    config.lrt = dataclasses.replace(args.lrt)
    config.training.seq_len = args.max_seq_len
    return config


def _new_output(path: str | os.PathLike, is_dir: bool) -> Path:
    path = Path(path)
    if path.exists() and not (is_dir and path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(
            f"output {str(path)!r} exists; remove it or choose another "
            + ("folder (an empty one is fine)" if is_dir else "file")
        )
    return path


def _describe_keys(obj: Any) -> str:
    return f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
