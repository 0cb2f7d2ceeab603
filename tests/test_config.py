"""Config: TOML + CLI overrides, and one clear message for every bad key or value."""

import importlib.util
from pathlib import Path

import pytest

from titan_lrt.config import ConfigError, config_reference, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))


def test_cli_overrides_in_both_spellings_booleans_and_lists(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[training]\nsteps = 7\n[lrt]\nmode = "jacobi"\n[model]\ndim = 128\n')
    config, print_only = load_config(
        ["--config", str(toml), "--training.steps=9", "--lrt.jacobi_passes", "3",
         "--lrt.jacobi_weights=0.5,1,2", "--lrt.detach_buffer", "--checkpoint.enable=false", "--print-config"]
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
