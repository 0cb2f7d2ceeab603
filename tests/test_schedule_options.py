"""Cheaper LRT schedules: refine_fraction, start_step, pass0_backward, jacobi_mix.

Float64 against literal references: a non-refining step is one zero-memory pass with
a hand-written cross-entropy, a refining one the full schedule; pass 0 without autograd
is the detached gradient without pass 0's term; the FLOPs counted are the FLOPs run.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import scalars, tiny_args
from lrt_reference import sample_tokens, tiny_model
from lrt_reference import tiny_args as tiny_model_args
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from titan_lrt.config import load_config
from titan_lrt.model.accounting import run_flops, step_flops
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer
from titan_lrt.parallel.compile import apply_compile
from titan_lrt.preemption import StopRequest
from titan_lrt.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, tokens, targets, passes=None):
    model.zero_grad(set_to_none=True)
    result = run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward(), passes=passes)
    return result, _grads(model)


def _assert_same(got: dict, want: dict, tol=1e-12):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, msg=name)


def _zero_memory_loss(model, tokens, targets):
    """Literal pass-0-only step: one forward without memory, mean cross-entropy by hand."""
    logits = model(tokens).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# ---- which steps refine ---------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 0.5, 0.25, 1 / 3, 0.7])
def test_refine_fraction_spreads_refining_steps_evenly(p):
    lrt = LRTArgs(mode="interleaved", refine_fraction=p)
    refining = [s for s in range(600) if lrt.refines_at(s)]
    assert len(refining) == math.floor(600 * p + 1e-9)
    for window in (10, 37):  # any window of L steps holds floor(L p) or ceil(L p) of them
        for start in range(0, 600 - window):
            n = sum(start <= s < start + window for s in refining)
            assert math.floor(window * p - 1e-9) <= n <= math.ceil(window * p + 1e-9)


def test_start_step_runs_pass0_alone_before_it_and_the_schedule_from_it():
    lrt = LRTArgs(mode="interleaved", num_subsets=3, start_step=5)
    assert [lrt.passes_at(s, seed=0) for s in range(8)] == [1] * 5 + [4] * 3
    half = LRTArgs(mode="interleaved", refine_fraction=0.5, start_step=3)
    assert [half.passes_at(s, seed=0) for s in range(8)] == [1, 1, 1, 3, 1, 3, 1, 3]
    assert [LRTArgs(mode="off").passes_at(s, seed=0) for s in range(3)] == [1, 1, 1]


def test_jacobi_mix_draws_each_k_in_proportion_deterministically_from_the_seed():
    lrt = LRTArgs(mode="jacobi", jacobi_passes=3, jacobi_mix=[0.75, 0.22, 0.03])
    n = 20000
    draws = [lrt.passes_at(s, seed=0) for s in range(n)]
    freq = Counter(draws)
    for k, p in enumerate(lrt.jacobi_mix, start=1):
        assert abs(freq[k] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (k, freq)
    assert draws == [lrt.passes_at(s, seed=0) for s in range(n)]
    assert draws != [lrt.passes_at(s, seed=1) for s in range(n)]


@pytest.mark.parametrize(
    "lrt, message",
    [
        ({"mode": "interleaved", "refine_fraction": 0.0}, "lrt.refine_fraction=0.0 must be in (0, 1]"),
        ({"mode": "jacobi", "jacobi_passes": 3, "jacobi_mix": [0.5, 0.5]}, "one probability per K"),
        ({"mode": "jacobi", "jacobi_passes": 2, "jacobi_mix": [0.5, 0.6]}, "sum to 1"),
        ({"mode": "interleaved", "jacobi_mix": [1.0, 0.0]}, "needs lrt.mode='jacobi'"),
        ({"mode": "interleaved", "start_step": -1}, "lrt.start_step=-1 must be >= 0"),
    ],
)
def test_bad_schedule_options_fail_with_one_line(lrt, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ModelArgs(lrt=LRTArgs(**lrt))


# ---- what each step computes (float64) -------------------------------------------------


@pytest.mark.parametrize("mode", ["interleaved", "jacobi"])
def test_non_refining_steps_are_a_pass0_step_and_refining_steps_the_full_schedule(mode):
    lrt = {"mode": mode, "refine_fraction": 0.5, "num_subsets": 2, "jacobi_passes": 2}
    args = tiny_model_args(lrt=lrt)
    full_args = tiny_model_args(lrt={**lrt, "refine_fraction": 1.0})
    model, full, plain = tiny_model(args), Transformer(full_args).double(), Transformer(args).double()
    full.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    kinds = []
    for step in range(4):  # a few optimizer steps: the references follow the same weights
        tokens = sample_tokens(args, 2, 16, seed=step, bos_every=7)
        targets = sample_tokens(args, 2, 16, seed=100 + step)
        passes = args.lrt.passes_at(step, seed=0)
        kinds.append(passes)
        result, grads = _step(model, tokens, targets, passes)
        if passes == 1:
            plain.zero_grad(set_to_none=True)
            loss = _zero_memory_loss(plain, tokens, targets)
            loss.backward()
            want, want_loss = _grads(plain), loss.detach()
        else:
            reference, want = _step(full, tokens, targets)
            want_loss = reference.loss.detach()
        torch.testing.assert_close(result.loss.detach(), want_loss, rtol=1e-12, atol=1e-12)
        _assert_same(grads, {n: g for n, g in want.items() if n in grads})
        assert all(g.abs().sum() == 0 for n, g in want.items() if n not in grads)  # the pathway is idle
        with torch.no_grad():  # the same SGD step on the three copies
            for m in (model, full, plain):
                for name, p in m.named_parameters():
                    if name in grads:
                        p.sub_(0.1 * grads[name])
    assert kinds == [1, 2 if mode == "jacobi" else 3] * 2


@pytest.mark.parametrize(
    "lrt",
    [
        {"mode": "interleaved", "num_subsets": 2},
        {"mode": "interleaved", "num_subsets": 3, "kv_refresh": True},
        {"mode": "jacobi", "jacobi_passes": 3},
    ],
    ids=["s2", "s3_refresh", "jacobi3"],
)
def test_pass0_without_backward_is_the_detached_gradient_without_pass0s_term(lrt):
    args = tiny_model_args(lrt={**lrt, "pass0_backward": False, "detach_buffer": True})
    reference_args = tiny_model_args(lrt={**lrt, "pass0_weight": 0.0, "detach_buffer": True})
    if lrt["mode"] == "jacobi":
        reference_args = tiny_model_args(lrt={**lrt, "jacobi_weights": [0.0, 1.0, 1.0], "detach_buffer": True})
    model = tiny_model(args)
    reference = Transformer(reference_args).double()
    reference.load_state_dict(model.state_dict())
    tokens, targets = sample_tokens(args, 2, 18, bos_every=7), sample_tokens(args, 2, 18, seed=5)
    result, grads = _step(model, tokens, targets)
    want_result, want = _step(reference, tokens, targets)
    torch.testing.assert_close(result.loss, want_result.loss, rtol=1e-12, atol=1e-12)
    _assert_same(grads, want)
    for got, expected in zip(result.pass_losses, want_result.pass_losses):  # pass 0's loss is still reported
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_pass0_without_backward_in_a_two_pass_jacobi_step_by_hand():
    """Literal reference: states of a forward without autograd, shifted right and reset at BOS,
    feed one pass whose hand-written cross-entropy is the whole loss."""
    args = tiny_model_args(lrt={"mode": "jacobi", "jacobi_passes": 2, "pass0_backward": False})
    model = tiny_model(args)
    reference = Transformer(args).double()
    reference.load_state_dict(model.state_dict())
    tokens, targets = sample_tokens(args, 2, 18, bos_every=6), sample_tokens(args, 2, 18, seed=9)
    _, grads = _step(model, tokens, targets)

    with torch.no_grad():
        states = reference(tokens).states
    memory = torch.zeros_like(states)
    memory[:, 1:] = states[:, :-1]
    memory[tokens == args.bos_token_id] = 0
    logits = reference(tokens, memory=memory).logits
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).backward()
    _assert_same(grads, _grads(reference))


# ---- FLOPs of what ran -----------------------------------------------------------------


def _small_args(**lrt) -> ModelArgs:
    return ModelArgs(
        vocab_size=128, n_layers=2, dim=64, n_heads=2, max_seq_len=64, value_embeds="all", lrt=LRTArgs(**lrt)
    )


@pytest.mark.parametrize(
    "lrt, passes",
    [
        ({"mode": "interleaved", "pass0_backward": False}, None),
        ({"mode": "interleaved", "refine_fraction": 0.5}, 1),
        ({"mode": "jacobi", "jacobi_passes": 3, "jacobi_mix": [0.2, 0.3, 0.5]}, 2),
        ({"mode": "jacobi", "jacobi_passes": 3, "pass0_backward": False}, 3),
    ],
)
def test_counted_flops_are_the_flops_the_step_runs(lrt, passes):
    """PyTorch's FLOP counter sees the matmuls of the step; with attention added by hand
    (forward x3 when trained, x1 for pass 0 without autograd) it equals the accounting."""
    args = _small_args(**lrt)
    model = Transformer(args)
    model.init_weights()
    T = 32
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(1, 128, (2, T), generator=g), torch.randint(1, 128, (2, T), generator=g)
    with FlopCounterMode(display=False) as counter:
        run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward(), passes=passes)
    matmuls = counter.get_total_flops() / tokens.numel()
    n = passes or args.lrt.num_passes
    full_passes_trained = {"interleaved": 1.0, "jacobi": n - 1.0}[args.lrt.mode] if n > 1 else 0.0
    pass0_multiplier = 3 if args.lrt.pass0_backward or n == 1 else 1
    attention_forward = 2 * 2 * 64 * (T + 1) / 2 * 2  # QK^T and PV, 2 layers
    attention = attention_forward * (pass0_multiplier + 3 * full_passes_trained)
    # without gradients into the buffer the backward also skips the input gradient of the feedback
    # projection, which "a trained pass costs 3 forwards" counts: under 1% at this size
    exact = args.lrt.pass0_backward or n == 1
    assert matmuls + attention == pytest.approx(step_flops(args, T, passes).total, rel=1e-9 if exact else 0.01)


def test_run_flops_sum_the_steps_each_kind_costs():
    args = _small_args(mode="interleaved", refine_fraction=0.25, start_step=4)
    cumulative = run_flops(args, 32, steps=12, seed=0)
    full, pass0 = step_flops(args, 32).total, step_flops(args, 32, passes=1).total
    refining = [s for s in range(12) if s >= 4 and (s + 1) % 4 == 0]  # steps 7 and 11
    assert refining == [7, 11]
    assert cumulative[-1] == pytest.approx(2 * full + 10 * pass0, rel=1e-12)
    assert cumulative[6] == pytest.approx(7 * pass0, rel=1e-12)


# ---- compile: a new kind of step compiles once ------------------------------------------


def test_steps_of_different_kinds_compile_once_per_kind(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    args = _small_args(mode="interleaved", num_subsets=2, refine_fraction=0.5, pass0_backward=False)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    apply_compile(model, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(1, 128, (2, 32), generator=g), torch.randint(1, 128, (2, 32), generator=g)
    counters.clear()
    graphs = []
    for step in range(6):
        _step(model, tokens, targets, args.lrt.passes_at(step, seed=0))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2:] == [graphs[1]] * 4, graphs  # after one step of each kind, nothing new


# ---- the trainer ------------------------------------------------------------------------


def _train(small_data, dump, steps, *extra):
    config, _ = load_config(
        tiny_args(small_data, dump, f"--training.steps={steps}", "--metrics.log_freq=1", "--eval.interval=0", *extra)
    )
    trainer = Trainer(config)
    trainer.resume()
    trainer.train(StopRequest())
    return trainer


def test_start_step_switches_exactly_at_its_step_across_a_resume(small_data, tmp_path):
    options = ("--lrt.start_step=3", "--lrt.refine_fraction=0.5", "--checkpoint.interval=2")
    _train(small_data, tmp_path / "ref", 6, *options)
    _train(small_data, tmp_path / "run", 2, *options)
    resumed = _train(small_data, tmp_path / "run", 6, *options)
    want = scalars(tmp_path / "ref" / "tb", "loss/total")
    got = scalars(tmp_path / "run" / "tb", "loss/total")
    assert [got[s] for s in range(3, 7)] == pytest.approx([want[s] for s in range(3, 7)], rel=1e-6, abs=1e-6)
    refined = sorted(scalars(tmp_path / "run" / "tb", "loss/pass2"))  # logged on steps that refine
    assert refined == [4, 6]  # 1-based: optimizer steps 3 and 5 are the first two at or after start_step
    # FLOPs of what ran: four pass-0 steps, two full ones; carried over the resume
    seq_len, tokens = 64, 4 * 64
    args = resumed.model_args
    expected = tokens * (4 * step_flops(args, seq_len, 1).total + 2 * step_flops(args, seq_len).total)
    assert scalars(tmp_path / "run" / "tb", "flops/seen")[6] == pytest.approx(expected, rel=1e-5)
    assert sum(resumed.state.flops_seen.values()) == pytest.approx(expected, rel=1e-12)


# ---- optimizer states exist before a parameter's first gradient ---------------------------


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_created_optimizer_states_change_no_update_and_keep_skipped_parameters_in_checkpoints(name):
    from test_optim import optimizers_of

    args = tiny_model_args(lrt={"mode": "interleaved"})
    models = [tiny_model(args).float(), tiny_model(args).float()]
    optimizers = [optimizers_of(m, name=name, weight_decay=0.1) for m in models]
    for opt in optimizers[1]:
        opt.state.clear()  # torch's own lazy states, created at each parameter's first gradient
    pathway = {n for n, _ in models[0].named_parameters() if "feedback" in n or "gamma" in n}
    assert pathway
    for step in range(4):
        for model, opt in zip(models, optimizers):
            for n, p in model.named_parameters():
                skip = step < 2 and n in pathway  # the pathway idles on the first steps (start_step)
                p.grad = None if skip else torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        if step == 0:  # what a checkpoint of the lazy states would miss, and a fresh one expects
            lazy_keys, created_keys = set(optimizers[1].state_dict()), set(optimizers[0].state_dict())
            assert any(n in k for k in created_keys - lazy_keys for n in pathway)
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    fresh = optimizers_of(tiny_model(args).float(), name=name, weight_decay=0.1)
    assert set(fresh.state_dict()) == created_keys


def test_the_schedule_options_may_change_at_resume_and_the_schedule_may_not():
    from titan_lrt.resume_settings import refusal

    for key, old, new in [
        ("lrt.refine_fraction", 1.0, 0.5),
        ("lrt.start_step", 0, 100),
        ("lrt.pass0_backward", True, False),
        ("lrt.jacobi_mix", [], [0.5, 0.5]),
    ]:
        assert refusal({key: (old, new)}) is None, key
    assert "lrt.num_subsets changed at resume" in refusal({"lrt.num_subsets": (2, 4)})


@pytest.mark.parametrize("wrap", ["selective_ac", "float8"])
def test_the_cheaper_steps_compose_with_activation_checkpointing_and_float8(wrap):
    """Pass 0 without autograd, then a pass-0-only step: checkpointed blocks give the plain model's
    loss and gradients; emulated float8 linears run both kinds of step and stay close."""
    from titan_lrt.parallel.activation_checkpoint import apply_activation_checkpointing
    from titan_lrt.parallel.float8 import apply_float8

    args = _small_args(mode="interleaved", num_subsets=2, kv_refresh=True, pass0_backward=False)
    torch.manual_seed(0)
    plain = Transformer(args)
    plain.init_weights()
    wrapped = Transformer(args)
    wrapped.load_state_dict(plain.state_dict())
    if wrap == "selective_ac":
        apply_activation_checkpointing(wrapped, mode="selective", selective_option="op")
    else:
        apply_float8(wrapped, recipe="tensorwise", emulate=True, fsdp=False)
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(1, 128, (2, 32), generator=g), torch.randint(1, 128, (2, 32), generator=g)
    for passes in (3, 1):
        result_p, grads_p = _step(plain, tokens, targets, passes)
        result_w, grads_w = _step(wrapped, tokens, targets, passes)
        tol = 0 if wrap == "selective_ac" else 0.05
        torch.testing.assert_close(result_w.loss, result_p.loss, rtol=tol, atol=tol)
        names = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in grads_w.items()}
        assert names.keys() == grads_p.keys()
        if wrap == "selective_ac":
            for name, grad in names.items():
                torch.testing.assert_close(grad, grads_p[name], rtol=1e-6, atol=1e-7, msg=name)
