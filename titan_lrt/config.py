"""Run configuration: typed sections read from TOML, overridden from the command line.

    ./run_train.sh --config train_configs/debug_model.toml --training.steps=200 --lrt.num_subsets 4

Every key is a field of a section dataclass below, with a type, a default and
a docstring. Unknown keys and bad values fail before any heavy work starts,
with one message that names the key, the bad value and what is allowed. The
defaults here are the only ones (builders take these values as keyword-only
arguments without defaults); the allowed values of a choice are the tuple
exported by the module that branches on it, and `setting` declares them. The
[model] section also accepts any backbone field of `ModelArgs` (e.g. `dim`) to
override the chosen flavor; [lrt] is `LRTArgs` itself.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titan_lrt.allowed import allowed_text, message, setting, suggest
from titan_lrt.checkpoint import ASYNC_MODES
from titan_lrt.data.loader import MAX_NUM_WORKERS
from titan_lrt.data.mixture import check_weights
from titan_lrt.data.packing import PACKING_MODES
from titan_lrt.guards import SPIKE_ACTIONS
from titan_lrt.model.args import FLAVORS, LRTArgs, ModelArgs
from titan_lrt.optim import DECAY_TYPES, IMPLEMENTATIONS, MUON_ADJUST_LR, OPTIMIZERS
from titan_lrt.parallel.activation_checkpoint import MODES as AC_MODES
from titan_lrt.parallel.activation_checkpoint import selective_every
from titan_lrt.parallel.distributed import DEVICES
from titan_lrt.parallel.float8 import RECIPES
from titan_lrt.parallel.fsdp import RESHARD_POLICIES
from titan_lrt.precision import DTYPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NONFINITE_POLICIES = ("stop", "skip")
"""training.nonfinite, which the trainer branches on."""
GRADIENT_SYNC = ("last_micro_batch", "every_micro_batch")
"""parallelism.gradient_sync, which the trainer branches on."""


@dataclass
class Job:
    dump_folder: str = "./outputs"
    """Folder of this run: checkpoints, TensorBoard logs and the resolved config go below it."""

    description: str = ""
    """Free text shown at start-up and saved with the config."""


@dataclass
class Model:
    flavor: str = "debug"
    """Preset of the backbone sizes (titan_lrt.model.args.FLAVORS); any ModelArgs field
    given in this section (n_layers, dim, n_heads, ...) overrides the preset."""

    tokenizer_path: str = "assets/tokenizer/stdlib_bpe8k.json"
    """tokenizer.json to use. If it does not exist and data.dataset is "stdlib", a
    byte-level BPE of model.vocab_size tokens is trained on the embedded corpus."""

    vocab_size: int = 8192
    """Vocabulary of a tokenizer trained here; a given tokenizer.json sets its own."""

    overrides: dict = field(default_factory=dict, metadata={"internal": True})


@dataclass
class Training:
    steps: int = setting(100, ge=1)
    """Optimizer steps of the run."""

    seq_len: int = setting(512, ge=1)
    """Tokens per training sequence (the model's RoPE table covers it)."""

    local_batch_size: int = setting(8, ge=1)
    """Sequences per micro-batch on each data-parallel rank."""

    global_batch_size: int = setting(0, ge=0)
    """Sequences per optimizer step over all ranks (0: local_batch_size x ranks, no
    accumulation); must be a multiple of local_batch_size x ranks, the rest is
    gradient accumulation."""

    max_norm: float = setting(1.0, ge=0)
    """Gradient clipping by global norm (0 disables)."""

    mixed_precision: str = setting("auto", choices=("auto", *DTYPES))
    """Autocast dtype. "auto": bfloat16 on GPUs and on CPUs with native bf16 matmuls,
    float32 on other CPUs (where bf16 matmuls are emulated and far slower)."""

    seed: int = 0
    """Seed of the model initialisation and of the data order."""

    deterministic: bool = False
    """Use deterministic kernels only (slower; for debugging and exact comparisons)."""

    nonfinite: str = setting("stop", choices=NONFINITE_POLICIES)
    """What a NaN/inf loss or gradient norm does: stop the run with a clear message,
    or skip the optimizer step (and stop after 10 in a row). Parameters that an update made
    non-finite always stop the run (before any checkpoint of them)."""

    spike_factor: float = 2.0
    """A step's loss is flagged when above this many times the running mean of the earlier
    losses (an exponential average over about the last 50 steps)."""

    spike_patience: int = setting(5, ge=1)
    """Flagged steps in a row that make a loss spike (divergence)."""

    spike_action: str = setting("stop", choices=SPIKE_ACTIONS)
    """What a loss spike does: nothing, a warning, stop the run (exit code 3), or "rollback":
    reload the newest checkpoint from before the spike and continue on the batches after it."""

    device: str = setting("auto", choices=DEVICES)
    """Where to train ("auto": cuda when available)."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = setting(1, ge=1)
    """HSDP: number of replicas of the sharded model (1: FSDP over all ranks); must
    divide the number of ranks, each replica sharding over the rest."""

    context_parallel_degree: int = setting(1, ge=1)
    """Ranks that share each sequence (context parallelism): every rank of a group
    gets the same rows and computes 1/degree of their positions (a head and a
    mirrored tail chunk); attention and the LRT buffer are gathered over the group.
    Must divide the number of ranks / data_parallel_replicate_degree; seq_len must
    be a multiple of 2 x degree. Parameters are sharded over data-parallel x CP ranks."""

    fsdp_reshard_after_forward: str = setting("default", choices=RESHARD_POLICIES)
    """Free a block's gathered parameters after each pass's forward ("default": all
    blocks but the last; "never": keep them gathered across the S + 1 passes of a
    step, trading memory for fewer all-gathers)."""

    mixed_precision_reduce: str = setting("float32", choices=tuple(DTYPES))
    """Dtype of the gradient reduce-scatter (parameters compute in training.mixed_precision)."""

    gradient_sync: str = setting("last_micro_batch", choices=GRADIENT_SYNC)
    """When gradients are reduced across ranks during accumulation: once per step
    (less communication, unsharded gradients held meanwhile) or after every micro-batch."""

    process_group_timeout_seconds: int = setting(600, ge=1)
    """Timeout of collectives (a hung rank fails the run after this long)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile every block and the LM head with its loss (static shapes; the
    first step compiles one graph per pass kind)."""


@dataclass
class ActivationCheckpoint:
    mode: str = setting("none", choices=AC_MODES)
    """Recompute block activations in the backward instead of keeping them."""

    selective_ac_option: str = "op"
    """With mode = "selective": "op" (keep matmul and attention outputs, recompute the
    rest) or an integer N (checkpoint every N-th block)."""


@dataclass
class Float8:
    enable: bool = False
    """float8 matmuls (torchao) for the block linears and the feedback projection;
    never the LM head. Needs compute capability >= 8.9 unless emulated."""

    recipe_name: str = setting("tensorwise", choices=RECIPES)
    """Scaling recipe; tensorwise also all-gathers FSDP weights in float8."""

    emulate: bool = False
    """Emulate float8 in higher precision (CPU tests of the numerics)."""


@dataclass
class Optimizer:
    name: str = setting("adamw", choices=OPTIMIZERS)
    """adamw, or muon for the 2-D block matrices with AdamW for the rest."""

    lr: float = setting(1e-2, ge=0)
    """Peak AdamW learning rate of the matrices; the other groups get lr x their multiplier."""

    embedding_lr_mult: float = setting(30.0, ge=0)
    """LR multiplier of the token and value embeddings (RMS-normed, init std 1: they need
    a large LR to move)."""

    head_lr_mult: float = setting(4.0, ge=0)
    """LR multiplier of the LM head."""

    scalar_lr_mult: float = setting(0.2, ge=0)
    """LR multiplier of the per-layer scalars (residual scales, x0 scales, gammas)."""

    dim_lr_scaling: bool = False
    """Scale every AdamW group by (dim / 768)^-0.5, as nanochat does."""

    beta1: float = setting(0.9, ge=0, lt=1)
    """AdamW beta1."""

    beta2: float = setting(0.95, ge=0, lt=1)
    """AdamW beta2."""

    eps: float = setting(1e-8, ge=0)
    """AdamW epsilon."""

    weight_decay: float = setting(0.0, ge=0)
    """Decoupled weight decay of the matrices (never on embeddings, head or scalars)."""

    implementation: str = setting("fused", choices=IMPLEMENTATIONS)
    """AdamW kernel implementation."""

    muon_lr: float = setting(0.02, ge=0)
    """Muon learning rate of the 2-D block matrices (name = "muon")."""

    muon_momentum: float = setting(0.95, ge=0, lt=1)
    """Muon momentum."""

    muon_nesterov: bool = True
    """Nesterov momentum in Muon."""

    muon_ns_steps: int = setting(5, ge=1)
    """Newton-Schulz iterations of Muon's orthogonalisation."""

    muon_adjust_lr: str = setting("original", choices=MUON_ADJUST_LR)
    """How Muon scales its update by the matrix shape."""

    lrt_lr_scale: float = setting(1.0, gt=0)
    """Multiplies the learning rate of the LRT pathway's own parameters (feedback projections
    and gammas; not the feedback gate rows, which share a matrix with the other gates) in
    AdamW and Muon alike, under the same LR schedule: below 1 the pathway moves more slowly
    than the backbone (a remedy for a pathway that traps a run early)."""


@dataclass
class LRScheduler:
    warmup_steps: int = setting(10, ge=0)
    """Linear warmup from 0 to the peak learning rate."""

    decay_ratio: float = setting(0.2, ge=0, le=1)
    """Fraction of the steps, at the end of the run, over which the LR decays."""

    decay_type: str = setting("linear", choices=DECAY_TYPES)
    """Shape of the decay."""

    min_lr_factor: float = setting(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""


@dataclass
class Data:
    dataset: str = "stdlib"
    """"stdlib" (the embedded offline corpus, built on first use), a folder prepared by
    tools/prepare_data.py (read pre-tokenized), a local folder or file of
    parquet/jsonl/json/txt, or a Hugging Face hub name (needs streaming = true)."""

    mixture: dict[str, float] = field(default_factory=dict)
    """Several sources (prepared or raw folders) and their weights, e.g.
    { "data/web" = 0.7, "data/code" = 0.3 }: documents are drawn in these proportions
    (deterministic from the seed). Overrides dataset when not empty."""

    corpus_path: str = "assets/stdlib_corpus"
    """Where the embedded corpus is built and read (dataset = "stdlib")."""

    text_column: str = "text"
    """Column holding the document text."""

    streaming: bool = False
    """Stream a hub dataset (the only way a hub name is read; needs the network)."""

    packing: str = setting("bos_aligned", choices=PACKING_MODES)
    """How documents are packed into rows (see titan_lrt.data.packing)."""

    num_streams: int = setting(8, ge=1)
    """Fixed virtual data streams; any data-parallel world size dividing it can resume a run."""

    num_workers: int = setting(1, ge=0, le=MAX_NUM_WORKERS)
    """Background loader processes per rank (0: in the trainer); each packs whole streams, so at most
    num_streams / data-parallel ranks (1 for streamed data). Batches and resume are the same for every count."""


@dataclass
class Checkpoint:
    enable: bool = True
    """Save DCP checkpoints."""

    folder: str = "checkpoints"
    """Checkpoint folder, relative to job.dump_folder."""

    interval: int = setting(50, ge=1)
    """Save every this many steps (and at the end)."""

    keep_latest_k: int = setting(3, ge=0)
    """Keep only the newest k checkpoints (0: keep all)."""

    async_mode: str = setting("disabled", choices=ASYNC_MODES)
    """Save while training continues: "async" from a background thread, "async_process"
    from a writer process per rank (less interference with training; starting it costs
    a few seconds once)."""

    load: str = "latest"
    """"latest" (resume when a checkpoint exists), "none", or the path of a step folder."""

    initial_load_path: str = ""
    """Checkpoint whose model weights initialise a new run (when there is nothing to resume)."""


@dataclass
class Metrics:
    log_freq: int = setting(10, ge=1)
    """Console line and TensorBoard scalars every this many steps."""

    enable_tensorboard: bool = True
    """Write TensorBoard event files."""

    save_tb_folder: str = "tb"
    """TensorBoard folder, relative to job.dump_folder."""


@dataclass
class Eval:
    interval: int = setting(50, ge=0)
    """Validation every this many steps (0: never; also at the end when > 0)."""

    steps: int = setting(4, ge=1)
    """Validation batches for the merged (schedule) bits per byte."""

    exact_sequences: int = setting(2, ge=0)
    """Validation sequences scored by exact recurrence (token-by-token decoding)."""

    split: str = "validation"
    """Dataset split used for validation."""


SECTIONS: dict[str, type] = {
    "job": Job,
    "model": Model,
    "lrt": LRTArgs,
    "training": Training,
    "parallelism": Parallelism,
    "compile": Compile,
    "activation_checkpoint": ActivationCheckpoint,
    "float8": Float8,
    "optimizer": Optimizer,
    "lr_scheduler": LRScheduler,
    "data": Data,
    "checkpoint": Checkpoint,
    "metrics": Metrics,
    "eval": Eval,
}

MODEL_OVERRIDES = tuple(
    f.name for f in dataclasses.fields(ModelArgs) if f.name not in ("lrt", "vocab_size", "bos_token_id", "max_seq_len")
)
"""ModelArgs fields the [model] section may set; vocabulary, BOS and length come
from the tokenizer and training.seq_len."""


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    lrt: LRTArgs = field(default_factory=LRTArgs)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    compile: Compile = field(default_factory=Compile)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    float8: Float8 = field(default_factory=Float8)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    data: Data = field(default_factory=Data)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    eval: Eval = field(default_factory=Eval)

    def model_args(self, vocab_size: int, bos_token_id: int) -> ModelArgs:
        """The model's arguments: flavor, overrides, tokenizer and sequence length."""
        base = FLAVORS[self.model.flavor]
        return base.replace(
            **self.model.overrides,
            vocab_size=vocab_size,
            bos_token_id=bos_token_id,
            max_seq_len=self.training.seq_len,
            lrt=dataclasses.replace(self.lrt),
        )

    def to_toml(self) -> str:
        """The resolved config as TOML that --config reads back."""
        lines = []
        for name in SECTIONS:
            section = getattr(self, name)
            lines.append(f"[{name}]")
            for f in dataclasses.fields(section):
                if f.metadata.get("internal"):
                    continue
                lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
            if name == "model":
                lines += [f"{k} = {_toml_value(v)}" for k, v in sorted(self.model.overrides.items())]
            lines.append("")
        return "\n".join(lines)


class ConfigError(ValueError):
    """A bad config key or value; the message says which and what is allowed."""


def load_config(argv: list[str]) -> tuple[Config, bool]:
    """Parse `--config FILE`, `--print-config` and `--section.key[=]value` overrides.

    Returns the validated config and whether --print-config was given.
    """
    args = list(argv)
    config_path, print_config, overrides = None, False, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--print-config":
            print_config = True
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                i += 1
                if i == len(args):
                    raise ConfigError("--config needs a TOML file path")
                config_path = args[i]
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = arg[2:], args[i + 1]
                i += 1
            else:  # a bare flag means true (for booleans)
                key, value = arg[2:], "true"
            overrides.append((key, value))
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE, --print-config or --section.key=value")
        i += 1

    config = Config()
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path}: no such file")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{config_path}: not valid TOML ({e})") from None
        for section, values in table.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{config_path}: top-level key {section!r} must be a [section]")
            for key, value in values.items():
                _set(config, section, key, value, source=config_path)
    for dotted, text in overrides:
        section, _, key = dotted.partition(".")
        _set(config, section, key, text, source="command line", from_text=True)
    validate(config)
    return config, print_config


def validate(config: Config) -> None:
    """Cross-field checks, before any heavy work (each value's own range and choices were
    checked by `titan_lrt.allowed.problem` when it was set)."""
    t = config.training
    if t.global_batch_size % t.local_batch_size:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} must be 0 or a multiple of "
            f"training.local_batch_size={t.local_batch_size}"
        )
    if not t.spike_factor > 1:
        raise ConfigError(f"training.spike_factor={t.spike_factor} must be > 1")
    if config.model.flavor not in FLAVORS:
        raise ConfigError(f"model.flavor={config.model.flavor!r}: allowed {sorted(FLAVORS)}")
    if config.lrt.mode == "interleaved" and t.seq_len < config.lrt.num_subsets:
        raise ConfigError(
            f"training.seq_len={t.seq_len} is shorter than lrt.num_subsets={config.lrt.num_subsets}: every subset "
            "needs a position; raise training.seq_len or lower lrt.num_subsets"
        )
    cp = config.parallelism.context_parallel_degree
    if cp > 1:
        if t.seq_len % (2 * cp):
            raise ConfigError(
                f"training.seq_len={t.seq_len} must be a multiple of 2 x parallelism.context_parallel_degree "
                f"= {2 * cp} (each rank takes a head and a tail chunk)"
            )
        if config.lrt.mode == "interleaved" and t.seq_len // (2 * cp) < config.lrt.num_subsets:
            raise ConfigError(
                f"training.seq_len={t.seq_len} is too short for lrt.num_subsets={config.lrt.num_subsets} under "
                f"parallelism.context_parallel_degree={cp}: each chunk of seq_len / (2 x degree) positions "
                "must hold every subset"
            )
    if config.activation_checkpoint.mode == "selective":
        try:
            selective_every(config.activation_checkpoint.selective_ac_option)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if config.data.mixture:
        try:
            check_weights(config.data.mixture)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
    try:  # the model's own checks (sizes, LRT options), with a placeholder vocabulary
        config.model_args(vocab_size=max(config.model.vocab_size, 1), bos_token_id=0)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def describe(section_cls: type) -> dict[str, str]:
    """Field docstrings of a section dataclass (read from its source)."""
    tree = ast.parse(inspect.getsource(section_cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_reference() -> str:
    """Markdown table of every key (the README's config reference)."""
    out = []
    for name, cls in SECTIONS.items():
        docs = describe(cls)
        out.append(f"\n**[{name}]**\n\n| key | default | meaning |\n| --- | --- | --- |")
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meaning = " ".join(filter(None, [docs.get(f.name, ""), allowed_text(f.metadata)]))
            out.append(f"| `{f.name}` | `{_toml_value(default)}` | {meaning} |")
        if name == "model":
            out.append(
                "| *any of* " + ", ".join(f"`{k}`" for k in MODEL_OVERRIDES) + " | flavor's | overrides the flavor "
                "(see `titan_lrt/model/args.py` for each) |"
            )
    return "\n".join(out)


# ---- internals ---------------------------------------------------------------------


def _set(config: Config, section: str, key: str, value: Any, source: str, from_text: bool = False) -> None:
    if section not in SECTIONS:
        raise ConfigError(
            f"{source}: unknown section [{section}]{suggest(section, SECTIONS)}; allowed: {', '.join(SECTIONS)}"
        )
    target = getattr(config, section)
    fields = {f.name: f for f in dataclasses.fields(target) if not f.metadata.get("internal")}
    if section == "model" and key in MODEL_OVERRIDES:
        ftype = typing.get_type_hints(ModelArgs)[key]
        metadata = {f.name: f for f in dataclasses.fields(ModelArgs)}[key].metadata
        config.model.overrides[key] = _checked(f"model.{key}", value, ftype, metadata, source, from_text)
        return
    if key not in fields:
        allowed = list(fields) + (list(MODEL_OVERRIDES) if section == "model" else [])
        raise ConfigError(
            f"{source}: unknown key {section}.{key}{suggest(key, allowed)}; allowed: {', '.join(allowed)}"
        )
    f = fields[key]
    ftype = typing.get_type_hints(type(target))[key]
    setattr(target, key, _checked(f"{section}.{key}", value, ftype, f.metadata, source, from_text))


def _checked(name: str, value: Any, ftype, metadata, source: str, from_text: bool):
    """The value as the field's type, if the field allows it."""
    value = _coerce(name, value, ftype, source, from_text)
    wrong = message(name, value, metadata)
    if wrong:
        raise ConfigError(f"{source}: {wrong}")
    return value


def _coerce(name: str, value: Any, ftype, source: str, from_text: bool):
    def bad(expected: str):
        return ConfigError(f"{source}: {name}={value!r} is not {expected}")

    origin = typing.get_origin(ftype)
    if origin is dict:  # a TOML table, or JSON on the command line
        _, value_type = typing.get_args(ftype)
        if from_text:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad('a table such as {"data/web": 0.7, "data/code": 0.3}') from None
        if not isinstance(value, dict):
            raise bad("a table of name = value")
        return {str(k): _coerce(f"{name}.{k}", v, value_type, source, False) for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(ftype)
        if from_text:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise bad("a list such as [0.5, 1.0] or 0.5,1.0") from None
            else:
                value = [v for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad(f"a list of {item_type.__name__}")
        return [_coerce(name, v, item_type, source, from_text and isinstance(v, str)) for v in value]
    if ftype is bool:
        if from_text:
            lowered = str(value).strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise bad("a boolean (true or false)")
    if ftype is int:
        if from_text:
            try:
                value = int(str(value).strip())
            except ValueError:
                raise bad("an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if ftype is float:
        if from_text:
            try:
                value = float(str(value).strip())
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if ftype is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise ConfigError(f"{name}: unsupported field type {ftype}")  # pragma: no cover


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
