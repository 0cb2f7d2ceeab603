"""Config: TOML + CLI overrides, and one clear message for every bad key or value."""

import dataclasses
import importlib.util
import inspect
from pathlib import Path

import pytest

from titan_lrt import checkpoint, guards, optim
from titan_lrt.allowed import problem
from titan_lrt.config import (
    GRADIENT_SYNC,
    NONFINITE_POLICIES,
    SECTIONS,
    Config,
    ConfigError,
    config_reference,
    load_config,
    validate,
)
from titan_lrt.data import loader, packing
from titan_lrt.model import args as model_args
from titan_lrt.parallel import activation_checkpoint, distributed, float8, fsdp, parallelize

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))


def test_cli_overrides_in_both_spellings_booleans_and_lists(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[training]\nsteps = 7\n[lrt]\nmode = "jacobi"\n[model]\ndim = 128\n')
    config, print_only = load_config(
        [
            "--config",
            str(toml),
            "--training.steps=9",
            "--lrt.jacobi_passes",
            "3",
            "--lrt.jacobi_weights=0.5,1,2",
            "--lrt.detach_buffer",
            "--checkpoint.enable=false",
            "--print-config",
        ]
    )
    assert print_only
    assert config.training.steps == 9 and config.lrt.mode == "jacobi" and config.lrt.jacobi_passes == 3
    assert config.lrt.jacobi_weights == [0.5, 1.0, 2.0]
    assert config.lrt.detach_buffer is True and config.checkpoint.enable is False
    assert config.model.overrides == {"dim": 128}
    args = config.model_args(vocab_size=100, bos_token_id=0)
    assert args.dim == 128 and args.max_seq_len == config.training.seq_len and args.lrt.jacobi_passes == 3


def test_resolved_config_reads_back_identically(tmp_path):
    config, _ = load_config(["--lrt.mode=interleaved", "--model.window_pattern=SSL", "--lrt.jacobi_weights=[1, 2]"])
    saved = tmp_path / "resolved.toml"
    saved.write_text(config.to_toml())
    again, _ = load_config(["--config", str(saved)])
    assert again == config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--training.stpes=5"], "unknown key training.stpes (did you mean 'steps'?)"),
        (["--trainng.steps=5"], "unknown section [trainng] (did you mean 'training'?)"),
        (["--training.steps=five"], "training.steps='five' is not an integer"),
        (["--training.max_norm=big"], "training.max_norm='big' is not a number"),
        (["--lrt.kv_refresh=maybe"], "lrt.kv_refresh='maybe' is not a boolean"),
        (["--lrt.mode=jacobii"], "lrt.mode='jacobii' (did you mean 'jacobi'?); allowed: off, interleaved, jacobi"),
        (["--training.mixed_precision=bf16"], "allowed: auto, bfloat16, float32"),
        (["--model.dimm=3"], "unknown key model.dimm (did you mean 'dim'?)"),
        (["--model.value_embeds=al"], "model.value_embeds='al' (did you mean 'all'?)"),
        (["--lrt.num_subsets=0"], "lrt.num_subsets=0 must be >= 1"),
        (["--model.dim=102"], "model.dim=102 must be divisible by model.n_heads=4"),
        (["--model.dim=100"], "head_dim=25 must be even for RoPE"),
        (["--lrt.mode=interleaved", "--lrt.inject_layers=0,7"], "lrt.inject_layers='0,7'"),
        (["--training.global_batch_size=12"], "must be 0 or a multiple of training.local_batch_size=8"),
        (["--model.flavor=d13"], "model.flavor='d13': allowed"),
        (["--data.num_workers=17"], "data.num_workers=17 must be in [0, 16]"),
        (["--eval.steps=0"], "eval.steps=0 must be >= 1"),
        (["--optimizer.lr=inf"], "optimizer.lr=inf must be a finite number >= 0"),
        (["--lr_scheduler.decay_ratio=-0.5"], "lr_scheduler.decay_ratio=-0.5 must be in [0, 1]"),
        (["--training.global_batch_size=-8"], "training.global_batch_size=-8 must be >= 0"),
        (
            ["--activation_checkpoint.mode=selective", "--activation_checkpoint.selective_ac_option=every"],
            "activation_checkpoint.selective_ac_option='every': allowed \"op\" or a positive integer N",
        ),
        (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
        (["positional"], "unexpected argument 'positional'"),
    ],
)
def test_bad_keys_and_values_get_one_clear_message(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert message in str(err.value)


def test_bad_toml_is_reported_with_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 1\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(["--config", str(bad)])
    typo = tmp_path / "typo.toml"
    typo.write_text("[lrt]\nnum_subset = 4\n")
    with pytest.raises(ConfigError, match="typo.toml: unknown key lrt.num_subset .did you mean 'num_subsets'"):
        load_config(["--config", str(typo)])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    config, _ = load_config(["--config", str(path)])
    config.model_args(vocab_size=config.model.vocab_size, bos_token_id=0)


def test_every_key_is_documented():
    reference = config_reference()
    for line in reference.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented key: {line}"
    assert "`num_subsets`" in reference and "`dump_folder`" in reference


def test_readme_config_reference_is_current():
    """README's reference block is what tools/config_reference.py generates from the dataclasses."""
    spec = importlib.util.spec_from_file_location("config_reference_tool", ROOT / "tools" / "config_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    readme = (ROOT / "README.md").read_text()
    assert tool.render_readme(readme) == readme, "run: python tools/config_reference.py --write"


# ---- allowed values: one home each, checked once where the config loads --------------------

MODULE_CHOICES = {
    "training.mixed_precision": ("auto", *parallelize.DTYPES),  # "auto" is resolved by the trainer
    "training.nonfinite": NONFINITE_POLICIES,  # the trainer's own (it imports the config)
    "training.device": distributed.DEVICES,
    "training.spike_action": guards.SPIKE_ACTIONS,
    "parallelism.fsdp_reshard_after_forward": fsdp.RESHARD_POLICIES,
    "parallelism.mixed_precision_reduce": tuple(parallelize.DTYPES),
    "parallelism.gradient_sync": GRADIENT_SYNC,  # the trainer's own
    "activation_checkpoint.mode": activation_checkpoint.MODES,
    "float8.recipe_name": float8.RECIPES,
    "optimizer.name": optim.OPTIMIZERS,
    "optimizer.implementation": optim.IMPLEMENTATIONS,
    "optimizer.muon_adjust_lr": optim.MUON_ADJUST_LR,
    "lr_scheduler.decay_type": optim.DECAY_TYPES,
    "data.packing": packing.PACKING_MODES,
    "checkpoint.async_mode": checkpoint.ASYNC_MODES,
    "lrt.mode": model_args.LRT_MODES,
    "lrt.projection": model_args.PROJECTIONS,
}
"""Every choice field of the config and the tuple of the module that branches on it."""


def choice_fields():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "choices" in f.metadata:
                yield f"{name}.{f.name}", f.metadata["choices"]


def test_every_choice_field_takes_its_modules_values():
    config_choices = dict(choice_fields())
    assert set(config_choices) == set(MODULE_CHOICES), "a choice field without its module's tuple (or vice versa)"
    for key, implemented in MODULE_CHOICES.items():
        assert tuple(config_choices[key]) == tuple(implemented), key


@pytest.mark.parametrize("key", sorted(MODULE_CHOICES))
def test_config_accepts_exactly_what_the_module_implements(key):
    for value in MODULE_CHOICES[key]:
        config, _ = load_config([f"--{key}={value}"])
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == value
    choices = MODULE_CHOICES[key]
    unimplemented = "unimplemented" if isinstance(choices[0], str) else max(choices) + 1
    with pytest.raises(ConfigError) as err:
        load_config([f"--{key}={unimplemented}"])
    allowed = ", ".join(map(str, choices))
    assert f"{key}={unimplemented!r}" in str(err.value) and str(err.value).endswith(f"; allowed: {allowed}")


def test_module_dispatch_covers_exactly_the_exported_values():
    """The tuples are the keys of the tables the modules branch on, so they cannot drift apart."""
    assert optim.OPTIMIZERS == tuple(optim._MUON_TAKES_MATRICES)
    assert optim.IMPLEMENTATIONS == tuple(optim._ADAMW_KERNELS)
    assert optim.DECAY_TYPES == tuple(optim._DECAY_SHAPES)
    assert packing.PACKING_MODES == tuple(packing._PACKERS)
    assert activation_checkpoint.MODES == tuple(activation_checkpoint._WRAPS)
    assert checkpoint.ASYNC_MODES == tuple(checkpoint._ASYNC_WRITERS)


def test_defaults_are_allowed_values():
    config = Config()
    for name in SECTIONS:
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            assert problem(getattr(section, f.name), f.metadata) is None, f"{name}.{f.name}"
    validate(config)


CONFIG_OWNED = {
    optim.build_optimizers: [f.name for f in dataclasses.fields(SECTIONS["optimizer"])],
    optim.build_lr_schedulers: ["steps"] + [f.name for f in dataclasses.fields(SECTIONS["lr_scheduler"])],
    checkpoint.CheckpointManager: ["interval", "keep_latest_k", "async_mode", "load", "initial_load_path"],
    loader.build_dataloader: ["split", "text_column", "num_streams", "packing", "seed", "num_workers", "streaming"],
    loader.PackedRowsDataset: ["num_streams", "packing", "seed"],
    loader.TokenBatchLoader: ["num_workers"],
    activation_checkpoint.apply_activation_checkpointing: ["mode", "selective_option"],
    float8.apply_float8: ["recipe", "emulate"],
    fsdp.apply_fsdp: ["reshard_after_forward"],
    distributed.init_distributed: ["device", "timeout_s"],
}
"""Builders and the arguments the config sets on them."""


@pytest.mark.parametrize("builder", list(CONFIG_OWNED), ids=lambda b: b.__name__)
def test_builders_take_config_owned_arguments_by_keyword_without_defaults(builder):
    parameters = inspect.signature(builder).parameters
    for name in CONFIG_OWNED[builder]:
        p = parameters[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{builder.__name__}({name}) must be keyword-only"
        assert p.default is inspect.Parameter.empty, f"{builder.__name__}({name}) has a default besides the config's"


def test_allowed_is_a_leaf_module():
    """titan_lrt.allowed is shared by the config and model/ (which imports nothing upward)."""
    import ast

    import titan_lrt.allowed

    tree = ast.parse(Path(titan_lrt.allowed.__file__).read_text())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m and m.startswith("titan_lrt")], modules


def test_model_args_check_their_fields_with_the_same_mechanism():
    from titan_lrt.model.args import LRTArgs, ModelArgs

    with pytest.raises(ValueError, match=r"^model\.value_embeds='every'; allowed: none, alternate, all$"):
        ModelArgs(value_embeds="every")
    with pytest.raises(ValueError, match=r"^lrt\.jacobi_passes=0 must be >= 1$"):
        ModelArgs(lrt=LRTArgs(jacobi_passes=0))
    with pytest.raises(ValueError, match=r"^lrt\.pass0_weight=-1\.0 must be a finite number >= 0$"):
        ModelArgs(lrt=LRTArgs(pass0_weight=-1.0))
