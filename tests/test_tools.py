"""The research tools on a real 2-step run: export round trips, generation, compute matching, plots."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from titan_lrt.checkpoint import CheckpointManager, ModelWrapper, checkpoint_problem
from titan_lrt.config import load_config
from titan_lrt.export import ModelFiles, load_model, read_model_files, write_exported_folder
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.decoding import generate_tokens
from titan_lrt.model.transformer import Transformer

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(trained_run):
    """The shared 2-step run (with validation): its dump folder and the trainer's final weights."""
    trainer, dump = trained_run
    return dump, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_tensors(got: dict, expected: dict):
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_export_round_trips_are_bit_exact(trained, tmp_path):
    dump, weights = trained
    step = dump / "checkpoints" / "step-00000002"
    convert = tool("convert_checkpoint").main
    assert convert([str(step), str(tmp_path / "exported"), "--to", "safetensors"]) == 0
    assert convert([str(tmp_path / "exported"), str(tmp_path / "dcp"), "--to", "dcp"]) == 0
    assert convert([str(tmp_path / "dcp"), str(tmp_path / "model.pt"), "--to", "torch"]) == 0
    assert convert([str(dump), str(tmp_path / "latest.pt"), "--to", "torch"]) == 0  # dump folder: newest step
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert convert([str(step), str(tmp_path / "model.pt"), "--to", "torch"]) == 2  # never overwrites

    original = read_model_files(step)
    assert_same_tensors(original.state_dict, weights)
    for path in ("exported", "dcp", "model.pt", "latest.pt"):
        files = read_model_files(tmp_path / path)
        assert files.args == original.args, path
        assert files.tokenizer_json == original.tokenizer_json, path
        assert_same_tensors(files.state_dict, weights)

    # the converted DCP folder is a complete checkpoint that a new run loads as its initial weights
    assert checkpoint_problem(tmp_path / "dcp") is None
    fresh = Transformer(original.args)
    manager = CheckpointManager(
        tmp_path / "new_run",
        {"model": ModelWrapper(fresh)},
        interval=1,
        keep_latest_k=0,
        async_mode="disabled",
        load="latest",
        initial_load_path=tmp_path / "dcp",
    )
    assert manager.load() == 0
    assert_same_tensors(fresh.state_dict(), weights)

    tokens = torch.tensor([[0, 5, 17, 300, 2, 0, 44]])
    reference = original.build_model()(tokens).logits
    for path in ("exported", "model.pt"):
        loaded = load_model(tmp_path / path)
        model, tokenizer, args = loaded.model, loaded.tokenizer, loaded.model.args
        assert args == original.args and tokenizer.bos_id == args.bos_token_id == 0
        assert torch.equal(model(tokens).logits, reference)
    model = load_model(step).model
    assert torch.equal(model(tokens).logits, reference)


def test_generate_is_reproducible_with_a_seed_from_any_model_form(trained, tmp_path):
    dump, _ = trained
    exported = tmp_path / "exported"
    write_exported_folder(read_model_files(dump), exported)
    generate = tool("generate").main

    def run(model, *extra):
        out = io.StringIO()
        assert (
            generate(
                [
                    str(model),
                    "def f(x):",
                    "import os",
                    "--max-new-tokens",
                    "12",
                    "--temperature",
                    "1.0",
                    "--top-k",
                    "50",
                    "--top-p",
                    "0.9",
                    "--batch-size",
                    "2",
                    *extra,
                ],
                out=out,
            )
            == 0
        )
        return out.getvalue()

    first = run(dump, "--seed", "3")
    assert first == run(dump, "--seed", "3") == run(exported, "--seed", "3")
    assert first != run(exported, "--seed", "4")
    lines = first.splitlines()
    assert any(line.startswith("[0] def f(x):") for line in lines)
    assert any(line.startswith("[1] import os") for line in lines)

    # the tool streams exactly what titan_lrt.model.decoding.generate samples
    tok = read_model_files(exported).tokenizer()
    model = load_model(exported).model
    prompt = [tok.bos_id, *tok.encode("class A:")]
    expected = generate_tokens(model, [prompt], 10, temperature=0.8, top_k=20, seed=5, stop_tokens=[tok.bos_id])[0]
    out = io.StringIO()
    assert (
        generate(
            [
                str(exported),
                "class A:",
                "--max-new-tokens",
                "10",
                "--temperature",
                "0.8",
                "--top-k",
                "20",
                "--seed",
                "5",
            ],
            out=out,
        )
        == 0
    )
    assert out.getvalue() == "class A:" + tok.decode([t for t in expected if t != tok.bos_id]) + "\n"


def test_greedy_generation_is_the_same_for_every_prefill_mode_of_a_baseline(small_data, tmp_path):
    _, tokenizer_path = small_data
    args = ModelArgs(
        vocab_size=512, n_layers=2, dim=64, n_heads=2, max_seq_len=64, value_embeds="all", lrt=LRTArgs(mode="off")
    )
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():  # move the zero-initialised projections so that the output depends on the prompt
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    files = ModelFiles(model.state_dict(), args, Path(tokenizer_path).read_text(), "<|bos|>", source="test")
    write_exported_folder(files, tmp_path / "baseline")
    generate = tool("generate").main
    outputs = {}
    for mode in ("exact", "schedule", "zero"):
        out = io.StringIO()
        assert (
            generate(
                [
                    str(tmp_path / "baseline"),
                    "def f(x):",
                    "for i in range(10):",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "16",
                    "--prefill",
                    mode,
                ],
                out=out,
            )
            == 0
        )
        outputs[mode] = out.getvalue()
    assert outputs["exact"] == outputs["schedule"] == outputs["zero"]
    assert len(outputs["exact"]) > len("[0] def f(x):\n[1] for i in range(10):\n")


def test_plan_matched_arithmetic_equals_a_hand_count(capsys):
    plan_matched = tool("plan_matched")
    argv = [
        "--model.n_layers=2",
        "--model.dim=64",
        "--model.n_heads=2",
        "--model.value_embeds=none",
        "--model.tokenizer_path=/no/tokenizer.json",
        "--model.vocab_size=500",
        "--training.seq_len=64",
        "--training.local_batch_size=4",
        "--lrt.mode=interleaved",
        "--lrt.num_subsets=2",
        "--job.dump_folder=out/tiny",
    ]
    # forward multiply-adds per token, T = 64 (a causal query sees 65/2 keys on average)
    layer = 64 * (64 + 64 + 64 + 64) + 2 * 64 * 256 + 2 * 64 * 65 / 2  # wq wk wv wo, MLP, QK^T and PV
    gates = 32 * 2 * 2  # 32 gate channels -> (local, feedback) x 2 KV heads; LRT only
    head = 64 * 512  # vocabulary 500 padded to 512
    feedback = 64 * 2 * 64  # shared W_K, W_V of the memory; the refinement passes only
    baseline = 2 * 3 * (2 * layer + head)  # 2 FLOPs per MAC, forward + backward = 3x forward
    lrt = 2 * 3 * (2 * (layer + gates) + head) + 2 * 3 * (2 * (layer + gates) + head + feedback)  # pass 0 + S passes
    params = 2 * 512 * 64 + 2 * (4 * 64 * 64 + 2 * 64 * 256 + 32 * 4 + 3) + 64 * 128  # embed+head, blocks, W_K/W_V
    per_step = 4 * 64

    config, _ = load_config(argv)
    args, _ = plan_matched.model_args_for_planning(config)
    runs = plan_matched.plan(config, args, "tokens", 1e6)
    assert [r.name for r in runs] == ["lrt", "baseline-equal-data", "baseline-equal-compute"]
    lrt_run, data_run, compute_run = runs
    assert lrt_run.flops_per_token == pytest.approx(lrt, rel=1e-12)
    assert data_run.flops_per_token == compute_run.flops_per_token == pytest.approx(baseline, rel=1e-12)
    assert lrt_run.steps == data_run.steps == round(1e6 / per_step) == 3906
    assert compute_run.steps == round(3906 * per_step * lrt / (baseline * per_step)) == 8056
    assert lrt_run.parameters == params == 172294
    assert plan_matched.plan(config, args, "flops", 1e12)[0].steps == round(1e12 / lrt / per_step)
    assert plan_matched.plan(config, args, "tokens_per_param", 20)[0].steps == round(20 * params / per_step)

    assert plan_matched.main(["--tokens", "1e6", *argv]) == 0
    out = capsys.readouterr().out
    assert "./run_train.sh " + " ".join(argv) + " --training.steps=3906 --job.dump_folder=out/tiny-lrt\n" in out
    assert "--training.steps=8056 --job.dump_folder=out/tiny-baseline-equal-compute --lrt.mode=off\n" in out
    assert plan_matched.main(["--tokens", "1e6", *argv, "--lrt.mode=off"]) == 2

    # a cheaper schedule: every other step refines, pass 0 without backward on those
    cheap, _ = load_config([*argv, "--lrt.refine_fraction=0.5", "--lrt.pass0_backward=false"])
    cheap_args, _ = plan_matched.model_args_for_planning(cheap)
    pass0_alone = 2 * 3 * (2 * (layer + gates) + head)
    refining = 2 * 1 * (2 * (layer + gates) + head) + 2 * 3 * (2 * (layer + gates) + head + feedback)
    lrt_run, _, compute_run = plan_matched.plan(cheap, cheap_args, "tokens", 1e6)
    assert lrt_run.steps == 3906  # 1953 of each kind
    assert lrt_run.flops_per_token == pytest.approx((pass0_alone + refining) / 2, rel=1e-12)
    assert compute_run.steps == round(3906 * (pass0_alone + refining) / 2 / baseline)
    by_flops = plan_matched.plan(cheap, cheap_args, "flops", lrt_run.flops)[0]
    assert by_flops.steps == 3906 and by_flops.flops == pytest.approx(lrt_run.flops, rel=1e-12)


def test_plot_runs_writes_pngs_from_real_and_sparse_logs(trained, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    pytest.importorskip("matplotlib")
    dump, _ = trained
    sparse = tmp_path / "sparse"
    with SummaryWriter(str(sparse)) as writer:  # an older run: total loss and tokens only
        for step in range(1, 4):
            writer.add_scalar("loss/total", 6.0 - step, step)
            writer.add_scalar("throughput/tokens_seen", 256 * step, step)
    out = tmp_path / "plots"
    assert tool("plot_runs").main([str(dump), str(sparse), "--labels", "lrt", "old", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bpb.png", "loss.png", "merged_vs_exact.png", "pass_losses.png"]
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tool("plot_runs").main([str(sparse), "--out", str(tmp_path / "only_sparse")]) == 0
    assert sorted(p.name for p in (tmp_path / "only_sparse").iterdir()) == ["loss.png"]


def test_an_exported_model_evaluates_like_its_checkpoint(trained, tmp_path, capsys):
    """The evaluation command reads an exported folder and gives the checkpoint's numbers."""
    from titan_lrt.eval.cli import main as eval_main

    dump, _ = trained
    write_exported_folder(read_model_files(dump), tmp_path / "exported")
    reports = {}
    for name, model in (("dcp", dump), ("exported", tmp_path / "exported")):
        out = tmp_path / f"{name}.json"
        assert (
            eval_main(
                [
                    "--checkpoint",
                    str(model),
                    "--data",
                    "stdlib",
                    "--batches",
                    "1",
                    "--batch-size",
                    "2",
                    "--seq-len",
                    "32",
                    "--modes",
                    "merged,zero",
                    "--no-progress",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
        reports[name] = json.loads(out.read_text())["bpb"]["scores"]
    capsys.readouterr()
    assert reports["exported"] == reports["dcp"]
