"""Bits per byte in every mode against naive recomputation (fp64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from lrt_reference import sample_tokens, sequential_recurrence, tiny_args, tiny_model

from titan_lrt.eval.bpb import BitsPerByte, evaluate_bpb, position_buckets
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import IGNORE_INDEX

TOL = dict(rel=1e-9, abs=1e-12)
ALL_MODES = ("merged", "passes", "exact", "zero")


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(lrt=None, T=12, batch=3, seed=0):
    args = tiny_args(lrt=lrt or {"num_subsets": 3})
    model = tiny_model(args, seed=seed)
    inputs = sample_tokens(args, batch=batch, T=T, seed=seed + 1, bos_every=5)
    targets = sample_tokens(args, batch=batch, T=T, seed=seed + 2)
    targets[0, -2] = IGNORE_INDEX
    targets[-1, 4] = args.bos_token_id
    g = torch.Generator().manual_seed(seed + 3)
    token_bytes = torch.randint(1, 5, (args.vocab_size,), generator=g)
    token_bytes[args.bos_token_id] = 0  # special tokens count zero bytes and are not scored
    return model, inputs, targets, token_bytes


def _bpb(token_loss, targets, token_bytes, positions=slice(None)):
    """bpb by hand: the sum of losses of targets with bytes, over their bytes."""
    nbytes = token_bytes[targets.clamp(min=0)] * (targets != IGNORE_INDEX)
    loss, nbytes = token_loss[:, positions], nbytes[:, positions]
    return float((loss * (nbytes > 0)).sum()) / math.log(2) / int(nbytes.sum())


def test_exact_bpb_equals_naive_token_by_token_recomputation():
    model, inputs, targets, token_bytes = _setup()
    result = evaluate_bpb(model, [(inputs, targets)], token_bytes, exact_sequences=3, modes=("exact",))
    logits, _ = sequential_recurrence(model, inputs)  # recomputes the whole prefix for every position
    naive = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    assert result.scores["exact"].value == pytest.approx(_bpb(naive, targets, token_bytes), **TOL)
    assert set(result.scores) == {"exact", "merged_on_exact_sample"}
    merged = run_schedule(model, inputs, targets).token_loss
    assert result.merged_minus_exact == pytest.approx(
        _bpb(merged, targets, token_bytes) - _bpb(naive, targets, token_bytes), **TOL
    )


def test_exact_covers_only_the_first_sequences_across_batches():
    model, inputs, targets, token_bytes = _setup(batch=3)
    batches = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]
    result = evaluate_bpb(model, batches, token_bytes, exact_sequences=3, modes=("exact",))
    alone = evaluate_bpb(model, [(inputs, targets)], token_bytes, exact_sequences=3, modes=("exact",))
    assert result.scores["exact"].value == pytest.approx(alone.scores["exact"].value, **TOL)
    two = evaluate_bpb(model, batches, token_bytes, exact_sequences=2, modes=("exact",))
    assert two.scores["exact"].total_bytes == int((token_bytes[targets[:2].clamp(min=0)] * (targets[:2] >= 0)).sum())
    assert two.throughput["exact"].tokens == 2 * inputs.size(1)


@pytest.mark.parametrize("lrt", [{"num_subsets": 3}, {"num_subsets": 5}, {"mode": "jacobi", "jacobi_passes": 3}])
def test_merged_bpb_recombines_the_passes(lrt):
    """Each position from the last pass that covered it; and every pass scored on its own positions."""
    model, inputs, targets, token_bytes = _setup(lrt=lrt)
    result = evaluate_bpb(model, [(inputs, targets)], token_bytes, modes=("merged", "passes"))
    step = run_schedule(model, inputs, targets)
    recombined = torch.full_like(targets, float("nan"), dtype=torch.float64)
    for loss, positions in zip(step.pass_token_losses, step.pass_positions):
        recombined[:, positions] = loss
    assert not recombined.isnan().any()
    assert result.scores["merged"].value == pytest.approx(_bpb(recombined, targets, token_bytes), **TOL)
    for i, (loss, positions) in enumerate(zip(step.pass_token_losses, step.pass_positions)):
        assert result.scores[f"pass{i}"].value == pytest.approx(_bpb(loss, targets[:, positions], token_bytes), **TOL)


@pytest.mark.parametrize("lrt", [{"num_subsets": 2}, {"mode": "jacobi"}, {"mode": "off"}])
def test_zero_memory_bpb_equals_pass_0(lrt):
    model, inputs, targets, token_bytes = _setup(lrt=lrt)
    result = evaluate_bpb(model, [(inputs, targets)], token_bytes, modes=("zero", "passes"))
    assert result.scores["zero"].value == pytest.approx(result.scores["pass0"].value, **TOL)
    assert set(result.throughput) == {"schedule", "zero"}


def test_position_buckets_split_the_totals():
    model, inputs, targets, token_bytes = _setup(T=12)
    starts = [0, 4, 9]
    result = evaluate_bpb(model, [(inputs, targets)], token_bytes, 3, modes=ALL_MODES, bucket_starts=starts)
    whole = evaluate_bpb(model, [(inputs, targets)], token_bytes, 3, modes=ALL_MODES, bucket_starts=[0])
    assert set(result.scores) == {
        "merged",
        "pass0",
        "pass1",
        "pass2",
        "pass3",
        "zero",
        "exact",
        "merged_on_exact_sample",
    }
    step = run_schedule(model, inputs, targets)
    for name, score in result.scores.items():
        buckets = score.buckets(seq_len=12)
        assert [b["positions"] for b in buckets] == ["0-3", "4-8", "9-11"]
        assert sum(b["bytes"] for b in buckets) == score.total_bytes == whole.scores[name].total_bytes
        assert sum(score.nats) == pytest.approx(sum(whole.scores[name].nats), **TOL)
        assert score.value == pytest.approx(whole.scores[name].value, **TOL)
    for (start, end), bucket in zip([(0, 4), (4, 9), (9, 12)], result.scores["merged"].buckets(12)):
        assert bucket["bpb"] == pytest.approx(_bpb(step.token_loss, targets, token_bytes, slice(start, end)), **TOL)
    assert position_buckets(2048) == [0, 64, 256, 1024]
    assert position_buckets(64) == [0]


def test_default_modes_keep_the_trainers_scalars():
    model, inputs, targets, token_bytes = _setup()
    scalars = evaluate_bpb(model, [(inputs, targets)], token_bytes, 1).scalars()
    assert list(scalars) == [
        "val/bpb_merged",
        "val/bpb_pass0",
        "val/bpb_pass1",
        "val/bpb_pass2",
        "val/bpb_pass3",
        "val/bpb_exact",
        "val/bpb_merged_minus_exact",
    ]
    with pytest.raises(ValueError, match="allowed"):
        evaluate_bpb(model, [(inputs, targets)], token_bytes, modes=("merged", "exactly"))


def test_bits_per_byte_accumulates_batches_exactly():
    score = BitsPerByte([0, 2])
    score.add(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 0, 2]]))
    score.add(torch.tensor([[4.0]]), torch.tensor([[3]]), positions=torch.tensor([2]))
    assert score.nats == [1.0, 7.0] and score.bytes == [1, 5]
    assert score.value == pytest.approx(8.0 / math.log(2) / 6)


def test_for_a_baseline_every_mode_is_the_same_model():
    model, inputs, targets, token_bytes = _setup(lrt={"mode": "off"})
    result = evaluate_bpb(model, [(inputs, targets)], token_bytes, exact_sequences=3, modes=ALL_MODES)
    assert set(result.scores) == {"merged", "pass0", "zero", "exact", "merged_on_exact_sample"}
    for name in ("pass0", "zero", "exact"):
        assert result.scores[name].value == pytest.approx(result.scores["merged"].value, **TOL)
    assert result.merged_minus_exact == pytest.approx(0, abs=1e-12)
