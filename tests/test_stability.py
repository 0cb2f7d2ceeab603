"""LRT training stability (issue 15): the warmup ramps of gamma and of the K/V feedback, the
pathway's learning-rate scale, and the early warning of a pathway that does nothing."""

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from conftest import scalars
from conftest import tiny_args as trainer_args
from lrt_reference import sample_tokens, tiny_args, tiny_model
from torch._dynamo.utils import counters

from titan_lrt.config import ConfigError, LRScheduler, Optimizer, load_config
from titan_lrt.data.tokenizer import word_level_tokenizer
from titan_lrt.eval.icl_tasks import TaskAlphabet, write_task_corpus
from titan_lrt.export import load_model, read_model_files, write_exported_folder
from titan_lrt.guards import PATHWAY_MARGIN, PathwayMonitor
from titan_lrt.model.args import LRTArgs
from titan_lrt.model.decoding import compile_decode_step, recurrent_token_losses
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer
from titan_lrt.optim import build_lr_schedulers, build_optimizers
from titan_lrt.parallel.compile import apply_compile
from titan_lrt.preemption import StopRequest
from titan_lrt.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]

GAMMA_N, GATE_N = 4, 8
"""Warmup lengths of the ramp tests: step / N is exact in binary at every step used."""


def _lrt(args, **changes):
    return args.replace(lrt=dataclasses.replace(args.lrt, **changes))


# ---- the default initialisation ----------------------------------------------------------------


def _gammas(model):
    return [layer.gamma for layer in model.layers if layer.gamma is not None]


def test_default_gamma_is_zero_so_the_injection_adds_nothing_yet_learns():
    """Every gamma starts at exactly 0: the schedule equals the same weights without residual
    injection, bit for bit, and each gamma's gradient is its central finite difference (float64)."""
    assert LRTArgs().gamma_init == 0.0
    args = tiny_args()
    fresh = Transformer(args)
    fresh.init_weights()
    assert len(_gammas(fresh)) == args.n_layers and all(g.item() == 0.0 for g in _gammas(fresh))
    model = tiny_model(args)  # every other weight moved off its init
    with torch.no_grad():
        for gamma in _gammas(model):
            gamma.zero_()
    without = Transformer(_lrt(args, residual_injection=False)).double()
    missing, unexpected = without.load_state_dict(model.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == sorted(f"layers.{i}.gamma" for i in range(args.n_layers))
    without.init_buffers()
    tokens = sample_tokens(args, batch=2, T=12, bos_every=7)
    targets = sample_tokens(args, batch=2, T=12, seed=5)
    got, expected = run_schedule(model, tokens, targets), run_schedule(without, tokens, targets)
    for a, b in zip(got.pass_losses + [got.token_loss], expected.pass_losses + [expected.token_loss]):
        assert torch.equal(a, b)
    got.loss.backward()
    eps = 1e-6
    for gamma in _gammas(model):
        with torch.no_grad():
            gamma.fill_(eps)
            up = run_schedule(model, tokens, targets).loss
            gamma.fill_(-eps)
            down = run_schedule(model, tokens, targets).loss
            gamma.zero_()
        finite_difference = (up - down) / (2 * eps)
        assert abs(float(finite_difference)) > 1e-4  # it can move off 0
        torch.testing.assert_close(gamma.grad[0], finite_difference, rtol=1e-6, atol=1e-9)


SYLLABLES = [f" {a}{b}" for a in "bcdfghkl" for b in "aeiouyrn"]
"""64 one-token words: the symbols of the synthetic tasks in the seed-stability study (RESULTS.md)."""


def _plateau_run(folder, *extra):
    """The study's set-up (the main job's model at depth 3, the three synthetic tasks over 64 word
    tokens, 8 x 256 tokens per step, lr 1e-2 after 20 warmup steps) for its first 100 steps, seed 0;
    returns the mean training loss of steps 81-100."""
    tokenizer = word_level_tokenizer([":", ",", "\n", *SYLLABLES])
    tokenizer.save(folder / "tokenizer.json")
    alphabet = TaskAlphabet.from_tokenizer(tokenizer)
    (folder / "tasks").mkdir()
    write_task_corpus(folder / "tasks" / "train.jsonl", tokenizer, alphabet, docs=20000, seed=0)
    argv = [
        f"--config={REPO / 'train_configs' / 'debug_model.toml'}",
        f"--job.dump_folder={folder / 'run'}",
        f"--data.dataset={folder / 'tasks'}",
        f"--model.tokenizer_path={folder / 'tokenizer.json'}",
        f"--model.vocab_size={tokenizer.vocab_size}",
        "--model.n_layers=3",
        "--training.steps=100",
        "--training.seed=0",
        "--training.mixed_precision=float32",
        "--lr_scheduler.decay_ratio=0",
        "--metrics.log_freq=1",
        "--eval.interval=0",
        "--checkpoint.enable=false",
        *extra,
    ]
    Trainer(load_config(argv)[0]).train(StopRequest())
    losses = scalars(folder / "run" / "tb", "loss/total")
    return sum(losses[s] for s in range(81, 101)) / 20


def test_a_seed_that_stayed_on_the_plateau_with_gamma_0_1_learns_with_the_default(tmp_path):
    """Seed 0 of the study: with gamma_init = 0.1 its loss stays on the plateau (3.03 here, and to step
    700 in the study); with the default it learns the tasks (2.70 here)."""
    assert _plateau_run(tmp_path) < 2.85


# ---- the ramps -----------------------------------------------------------------------------------


def test_ramp_values_at_the_boundaries():
    lrt = LRTArgs(mode="interleaved", gamma_warmup_steps=GAMMA_N, gate_warmup_steps=GATE_N)
    expected = {  # (gamma, gate) by hand: step / N, then 1
        0: (0.0, 0.0),
        1: (0.25, 0.125),
        3: (0.75, 0.375),
        4: (1.0, 0.5),
        5: (1.0, 0.625),
        7: (1.0, 0.875),
        8: (1.0, 1.0),
        9: (1.0, 1.0),
        10**6: (1.0, 1.0),
        None: (1.0, 1.0),  # unknown step: fully on
    }
    assert {step: lrt.ramps(step) for step in expected} == expected
    assert LRTArgs(mode="interleaved").ramps(0) == (1.0, 1.0)  # N = 0: off


# the steps at the boundaries of both ramps, and their literal values (gamma, gate)
BOUNDARY_RAMPS = {0: (0.0, 0.0), 3: (0.75, 0.375), 4: (1.0, 0.5), 5: (1.0, 0.625), 7: (1.0, 0.875), 8: (1.0, 1.0)}


def _ramped_and_hand_scaled(step, **lrt):
    """The model with warmups at `step`, and the same weights without warmups where gamma and the
    feedback projection were multiplied by the literal ramp values by hand."""
    args = tiny_args(lrt={"gamma_warmup_steps": GAMMA_N, "gate_warmup_steps": GATE_N, **lrt})
    ramped = tiny_model(args)
    ramped.set_training_step(step)
    plain_args = _lrt(args, gamma_warmup_steps=0, gate_warmup_steps=0)
    reference = Transformer(plain_args).double()
    reference.load_state_dict(ramped.state_dict())
    reference.init_buffers()
    gamma_r, gate_r = BOUNDARY_RAMPS[step]
    with torch.no_grad():
        for layer in reference.layers:
            if layer.gamma is not None:
                layer.gamma.mul_(gamma_r)
        reference.feedback.proj.weight.mul_(gate_r)
    return ramped, reference


def _assert_same(got, expected, exact):
    if exact:  # r in {0, 1}: r * w and the hand-scaled weight give the same bits
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("step", list(BOUNDARY_RAMPS))
@pytest.mark.parametrize(
    "lrt",
    [{"num_subsets": 3, "kv_refresh": True}, {"mode": "jacobi", "jacobi_passes": 3, "projection": "layerwise"}],
    ids=["interleaved_refresh", "jacobi_layerwise"],
)
def test_ramped_model_equals_hand_scaled_weights(step, lrt):
    """Training schedule (K/V refresh included) and exact recurrent decoding, float64."""
    ramped, reference = _ramped_and_hand_scaled(step, **lrt)
    args = ramped.args
    tokens = sample_tokens(args, batch=2, T=12, bos_every=7)
    targets = sample_tokens(args, batch=2, T=12, seed=5)
    exact = all(r in (0.0, 1.0) for r in BOUNDARY_RAMPS[step])
    with torch.no_grad():
        got, expected = run_schedule(ramped, tokens, targets), run_schedule(reference, tokens, targets)
        for a, b in zip(
            got.pass_losses + [got.token_loss, got.states],
            expected.pass_losses + [expected.token_loss, expected.states],
        ):
            _assert_same(a, b, exact)
        _assert_same(
            recurrent_token_losses(ramped, tokens, targets), recurrent_token_losses(reference, tokens, targets), exact
        )
    if step == 0:  # nothing of the memory gets in: every pass equals pass 0 of the same positions
        torch.testing.assert_close(got.token_loss, got.pass_token_losses[0], rtol=1e-12, atol=1e-13)


def test_merged_equals_the_exact_recurrence_with_ramps_below_one():
    T = 8
    args = tiny_args(lrt={"num_subsets": T, "gamma_warmup_steps": GAMMA_N, "gate_warmup_steps": GATE_N})
    model = tiny_model(args)
    model.set_training_step(3)  # gamma ramp 0.75, feedback ramp 0.375
    tokens = sample_tokens(args, batch=2, T=T, bos_every=5)
    targets = sample_tokens(args, batch=2, T=T, seed=3)
    with torch.no_grad():
        merged = run_schedule(model, tokens, targets).token_loss
        exact = recurrent_token_losses(model, tokens, targets)
        model.set_training_step(GATE_N)
        full = recurrent_token_losses(model, tokens, targets)
    torch.testing.assert_close(merged, exact, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(exact, full)  # the ramp matters


def test_changing_the_ramp_compiles_nothing_new(monkeypatch):
    """The ramps are tensors read by the compiled blocks and decode step, not constants baked in."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    lrt = {"mode": "jacobi", "gamma_warmup_steps": GAMMA_N, "gate_warmup_steps": GATE_N}
    args = tiny_args(n_layers=2, value_embeds="none", lrt=lrt)  # one block kind, two pass kinds: few graphs
    eager = tiny_model(args).float()
    compiled, decoder = copy.deepcopy(eager), copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager")  # blocks, as in training
    # the whole decode step, as for generation (Dynamo's guards decide recompiles whatever the
    # backend; "eager" skips the AOT trace, which would double this test's time)
    compile_decode_step(decoder, backend="eager")
    tokens = sample_tokens(args, batch=2, T=8, bos_every=5)
    targets = sample_tokens(args, batch=2, T=8, seed=3)
    counters.clear()
    losses = []
    for step in (0, 1, 3, 6, 9):
        for model in (compiled, decoder, eager):
            model.set_training_step(step)
        with torch.no_grad():
            got = [run_schedule(compiled, tokens, targets).loss, recurrent_token_losses(decoder, tokens, targets)]
            want = [run_schedule(eager, tokens, targets).loss, recurrent_token_losses(eager, tokens, targets)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        losses.append(float(got[0]))
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, f"recompiled at step {step}"
    assert len(set(losses[:4])) == 4  # each ramp value changed what the compiled code computed


# ---- the pathway's learning rate ----------------------------------------------------------------


def _optimizers(model, **changes):
    return build_optimizers(model, **{**vars(Optimizer()), **changes})


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_lrt_lr_scale_gives_the_pathway_the_scaled_lr_and_the_rest_the_base_lr(name):
    args = tiny_args(lrt={"projection": "layerwise"}, value_embeds="all")
    pathway = {"feedback.proj.weight", "layers.0.gamma", "layers.1.gamma", "layers.2.gamma"}
    model = tiny_model(args)  # float64: the updates are measured as differences of weights
    names = {id(p): n for n, p in model.named_parameters()}
    base = _optimizers(model, name=name)
    scaled = _optimizers(model, name=name, lrt_lr_scale=0.25)
    base_lr = {names[id(p)]: g["lr"] for g in base.param_groups for p in g["params"]}
    scaled_lr = {names[id(p)]: g["lr"] for g in scaled.param_groups for p in g["params"]}
    assert sorted(scaled_lr) == sorted(names.values())  # every parameter once
    assert sum(len(g["params"]) for g in scaled.param_groups) == len(names)
    for n, lr in scaled_lr.items():
        assert lr == (0.25 * base_lr[n] if n in pathway else base_lr[n]), n
    pathway_groups = {g["name"] for g in scaled.param_groups if names[id(g["params"][0])] in pathway}
    assert pathway_groups == {"matrix_pathway", "scalar_pathway"}
    assert {g["name"] for g in base.param_groups} == {"matrix", "embedding", "head", "scalar"}

    # the LR schedule scales the pathway's groups like the others; the updates follow the LRs
    schedulers = build_lr_schedulers(scaled, steps=10, **{**vars(LRScheduler()), "warmup_steps": 3})
    twin = copy.deepcopy(model)
    twin_opt = _optimizers(twin, name=name)
    twin_schedulers = build_lr_schedulers(twin_opt, steps=10, **{**vars(LRScheduler()), "warmup_steps": 3})
    tokens, targets = sample_tokens(args, 2, 8), sample_tokens(args, 2, 8, seed=4)
    for m, opt, sched in ((model, scaled, schedulers), (twin, twin_opt, twin_schedulers)):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        run_schedule(m, tokens, targets).loss.backward()
        opt.step()
        m.deltas = {n: p.detach() - before[n] for n, p in m.named_parameters()}
        sched.step()
    lrs = schedulers.last_lr()
    assert lrs["scalar_pathway"] == pytest.approx(0.25 * lrs["scalar"], rel=1e-12)
    assert lrs["matrix_pathway"] == pytest.approx(0.25 * lrs["matrix"], rel=1e-12)
    for n, delta in model.deltas.items():
        expected = twin.deltas[n] * (0.25 if n in pathway else 1.0)
        torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-12, msg=n)
    assert all(float(twin.deltas[n].abs().max()) > 0 for n in pathway)


def test_lrt_lr_scale_must_be_positive(small_data, tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer.lrt_lr_scale=0.* must be .*> 0"):
        load_config(trainer_args(small_data, tmp_path, "--optimizer.lrt_lr_scale=0"))


# ---- the early warning --------------------------------------------------------------------------


def _feed(monitor, losses, first_step=1):
    """Feed (pass0, merged) pairs; the (step, flag, message) of each."""
    out = []
    for step, (pass0, merged) in enumerate(losses, start=first_step):
        message = monitor.observe(step, pass0, merged)
        out.append((step, monitor.failing, message))
    return out


def test_warning_start_step():
    assert LRTArgs(mode="interleaved").warning_start_step == 200
    assert LRTArgs(mode="interleaved", warn_after_steps=0).warning_start_step is None
    assert LRTArgs(mode="off").warning_start_step is None
    assert LRTArgs(mode="jacobi", warn_after_steps=50, gamma_warmup_steps=80).warning_start_step == 80


def test_warning_never_fires_on_a_healthy_run():
    healthy = [(3.0 - 0.01 * i, (3.0 - 0.01 * i) * 0.97 + 0.002 * (-1) ** i) for i in range(60)]
    assert all(not failing and message is None for _, failing, message in _feed(PathwayMonitor(10), healthy))


def test_warning_fires_once_and_rearms_only_after_recovering():
    monitor = PathwayMonitor(start_step=5)
    stuck = [(1.30, 1.30 + 0.0005 * (-1) ** i) for i in range(12)]  # merged not below pass 0
    events = _feed(monitor, stuck)
    assert [failing for _, failing, _ in events] == [False] * 4 + [True] * 8  # from step 5 on
    messages = [(step, m) for step, _, m in events if m]
    assert len(messages) == 1 and messages[0][0] == 5
    assert "lrt.gamma_init = 0" in messages[0][1] and "optimizer.lrt_lr_scale" in messages[0][1]
    assert "lrt.gamma_warmup_steps" in messages[0][1]
    # barely past the margin: the flag clears but the warning is not re-armed (no flapping)
    events = _feed(monitor, [(1.30, 1.30 * (1 - 1.5 * PATHWAY_MARGIN))] * 30, 13)
    assert not any(m for *_, m in events) and not any(failing for _, failing, _ in events[-10:])
    assert _feed(monitor, stuck, 43)[-1][1]
    assert not any(m for *_, m in _feed(monitor, stuck, 55))
    # a real recovery re-arms it: the next failure warns again, once
    _feed(monitor, [(1.30, 1.20)] * 40, 70)
    again = [m for *_, m in _feed(monitor, stuck * 6, 110) if m]
    assert len(again) == 1


def test_short_run_with_a_useless_pathway_warns_once(small_data, tmp_path, caplog):
    """No K/V feedback and gammas that start at 0 and (almost) cannot move: the memory has no way
    in, merged loss = pass 0's."""
    config, _ = load_config(
        trainer_args(
            small_data,
            tmp_path,
            "--training.steps=6",
            "--lrt.kv_feedback=false",
            "--lrt.gamma_init=0",
            "--optimizer.lrt_lr_scale=1e-9",
            "--lrt.warn_after_steps=3",
            "--checkpoint.enable=false",
        )
    )
    trainer = Trainer(config)
    with caplog.at_level(logging.WARNING, logger="titan_lrt"):
        trainer.train(StopRequest())
    warnings = [r.getMessage() for r in caplog.records if "LRT pathway warning" in r.getMessage()]
    assert len(warnings) == 1 and "at step 3" in warnings[0], warnings
    assert scalars(tmp_path / "tb", "lrt/pathway_warning") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}
    for tag in ("lrt/grad_norm_pathway", "lrt/grad_norm_backbone", "lrt/gamma_min", "lrt/gamma_max"):
        values = scalars(tmp_path / "tb", tag)
        assert sorted(values) == list(range(1, 7)), tag
    assert all(v > 0 for v in scalars(tmp_path / "tb", "lrt/grad_norm_pathway").values())
    assert max(abs(v) for v in scalars(tmp_path / "tb", "lrt/gamma_max").values()) < 1e-9


# ---- resume and loading -----------------------------------------------------------------------


def test_resume_and_loading_set_the_ramps_of_the_restored_step(small_data, tmp_path):
    extra = (
        "--lrt.gamma_warmup_steps=8",
        "--lrt.gate_warmup_steps=4",
        "--optimizer.lrt_lr_scale=0.5",
        "--checkpoint.interval=3",
    )
    first = Trainer(load_config(trainer_args(small_data, tmp_path, "--training.steps=3", *extra))[0])
    first.train(StopRequest())
    resumed = Trainer(load_config(trainer_args(small_data, tmp_path, "--training.steps=5", *extra))[0])
    assert float(resumed.model.gamma_ramp) == 0.0  # a fresh model: step 0
    resumed.resume()
    assert resumed.state.step == 3
    assert (float(resumed.model.gamma_ramp), float(resumed.model.feedback.ramp)) == (0.375, 0.75)

    step_folder = tmp_path / "checkpoints" / "step-00000003"
    loaded = load_model(step_folder).model
    write_exported_folder(read_model_files(step_folder), tmp_path / "exported")
    exported = load_model(tmp_path / "exported").model
    for model in (loaded, exported):
        assert (float(model.gamma_ramp), float(model.feedback.ramp)) == (0.375, 0.75)

    resumed.train(StopRequest())
    logged = scalars(tmp_path / "tb", "lrt/gamma_ramp"), scalars(tmp_path / "tb", "lrt/gate_ramp")
    assert logged == ({1: 0.0, 2: 0.125, 3: 0.25, 4: 0.375, 5: 0.5}, {1: 0.0, 2: 0.25, 3: 0.5, 4: 0.75, 5: 1.0})
    assert (float(resumed.model.gamma_ramp), float(resumed.model.feedback.ramp)) == (0.625, 1.0)
