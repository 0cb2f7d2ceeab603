"""The invariants of DESIGN 2.4, in float64 on CPU."""

import pytest
import torch
from lrt_reference import sample_tokens, sequential_recurrence, tiny_args, tiny_model

from titan_lrt.model.args import LRTArgs
from titan_lrt.model.buffer import SharedBuffer
from titan_lrt.model.memory import apply_reset, memory_keep_mask, shift_right
from titan_lrt.model.schedule import pass_target_counts, run_schedule
from titan_lrt.model.transformer import IGNORE_INDEX, Transformer

TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"lrt": {"kv_refresh": True}},
        {"lrt": {"projection": "layerwise", "source_layer": 1}},
        {"lrt": {"inject_layers": "1-2", "kv_refresh": True}, "value_embeds": "all"},
        {"lrt": {"residual_injection": False, "kv_refresh": True}},
        {"lrt": {"kv_feedback": False}},
    ],
    ids=["default", "kv_refresh", "layerwise_mid_source", "inject_subset", "no_residual", "no_kv_feedback"],
)
def test_interleaved_with_one_position_per_subset_is_the_exact_recurrence(variant):
    T = 9
    args = tiny_args(**{**variant, "lrt": {"num_subsets": T, **variant.get("lrt", {})}})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=T, bos_every=5)
    with torch.no_grad():
        result = run_schedule(model, tokens)
    logits, states = sequential_recurrence(model, tokens)
    torch.testing.assert_close(result.logits, logits, **TOL)
    torch.testing.assert_close(result.states, states, **TOL)


def test_interleaved_with_one_subset_equals_two_jacobi_passes():
    args = tiny_args(lrt={"num_subsets": 1})
    tokens = sample_tokens(args, batch=2, T=12, bos_every=6)
    targets = sample_tokens(args, batch=2, T=12, seed=7)
    results, grads = [], []
    for mode in ("interleaved", "jacobi"):
        model = tiny_model(args.replace(lrt=args.lrt.__class__(**{**vars(args.lrt), "mode": mode})))
        results.append(run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward()))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    inter, jac = results
    torch.testing.assert_close(inter.loss, jac.loss, **TOL)
    for a, b in zip(inter.pass_losses, jac.pass_losses):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(inter.states, jac.states, **TOL)
    torch.testing.assert_close(inter.token_loss, jac.token_loss, **TOL)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **TOL, msg=name)


def test_pass0_equals_a_forward_with_zero_memory():
    args = tiny_args()
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=10)
    with torch.no_grad():
        skipped = model(tokens)
        zeros = model(tokens, memory=torch.zeros(2, 10, args.dim, dtype=torch.float64))
    torch.testing.assert_close(skipped.logits, zeros.logits, **TOL)
    torch.testing.assert_close(skipped.states, zeros.states, **TOL)
    for a, b in zip(skipped.kv, zeros.kv):
        torch.testing.assert_close(a.k, b.k, **TOL)
        torch.testing.assert_close(a.v, b.v, **TOL)


def test_lrt_off_equals_the_plain_backbone_and_lrt_only_adds_the_pathway():
    lrt_args = tiny_args(value_embeds="all")
    base_args = lrt_args.replace(lrt=lrt_args.lrt.__class__(mode="off"))
    base, lrt = tiny_model(base_args), tiny_model(lrt_args, seed=3)
    tokens = sample_tokens(lrt_args, batch=2, T=10)
    # Give the LRT model the backbone's weights; its feedback gates open at 1 (local) and
    # its value-embedding gate rows equal the backbone's gate.
    lrt_state = lrt.state_dict()
    for name, value in base.state_dict().items():
        if name.endswith("attention.gate.weight"):
            n_kv = lrt_args.kv_heads
            gate = torch.zeros_like(lrt_state[name])
            gate[2 * n_kv :] = value
            value = gate
        lrt_state[name] = value
    lrt.load_state_dict(lrt_state)
    with torch.no_grad():
        expected = base(tokens).logits
        off = run_schedule(base, tokens).logits
        pass0 = lrt(tokens).logits
    torch.testing.assert_close(off, expected, **TOL)
    torch.testing.assert_close(pass0, expected, **TOL)
    assert not any("feedback" in n or "gamma" in n for n, _ in base.named_parameters())


def test_memory_is_zero_at_position_zero_and_at_every_bos():
    args = tiny_args(lrt={"num_subsets": 3})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=3, T=13, bos_every=4)
    with torch.no_grad():
        buffer = SharedBuffer(model, tokens, model(tokens), 3, detach=True)
        for i in range(3):
            memory = buffer.memory(i)
            pos = buffer.positions[i]
            reset = (pos == 0)[None, :] | (tokens[:, i::3] == args.bos_token_id)
            assert reset.any()
            assert memory[reset].abs().max() == 0
            assert memory[~reset].abs().min() > 0
    states = torch.randn(3, 13, args.dim)
    keep = memory_keep_mask(tokens, torch.arange(13), args.bos_token_id, reset_at_bos=True)
    jacobi_memory = apply_reset(shift_right(states), keep)
    assert jacobi_memory[:, 0].abs().max() == 0
    assert jacobi_memory[tokens == args.bos_token_id].abs().max() == 0
    no_reset = memory_keep_mask(tokens, torch.arange(13), args.bos_token_id, reset_at_bos=False)
    assert no_reset[:, 1:].all() and not no_reset[:, 0].any()


SCHEDULES = {
    "off": {"mode": "off"},
    "interleaved": {"num_subsets": 2},
    "interleaved_refresh_layerwise": {"num_subsets": 3, "kv_refresh": True, "projection": "layerwise"},
    "interleaved_detached": {"num_subsets": 2, "detach_buffer": True, "kv_refresh": True},
    "jacobi": {"mode": "jacobi", "jacobi_passes": 3, "jacobi_weights": [0.5, 1.0, 2.0]},
    "jacobi_detached": {"mode": "jacobi", "detach_buffer": True},
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gradients_reach_every_parameter(schedule):
    args = tiny_args(lrt=SCHEDULES[schedule], value_embeds="all")
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=11, bos_every=5)
    targets = sample_tokens(args, batch=2, T=11, seed=9)
    run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward())
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("lrt", [{"num_subsets": 3, "kv_refresh": True}, {"mode": "jacobi", "jacobi_passes": 3}])
def test_per_pass_backward_with_detached_buffer_equals_one_backward(lrt):
    args = tiny_args(lrt={**lrt, "detach_buffer": True})
    tokens = sample_tokens(args, batch=2, T=11, bos_every=4)
    targets = sample_tokens(args, batch=2, T=11, seed=5)
    targets[0, 2] = IGNORE_INDEX

    micro = tiny_model(args)
    lasts = []
    micro_result = run_schedule(
        micro, tokens, targets, backward=lambda loss, last: (loss.backward(), lasts.append(last))
    )
    assert lasts == [False] * (len(lasts) - 1) + [True] and len(lasts) == len(micro_result.pass_losses)
    whole = tiny_model(args)
    whole_result = run_schedule(whole, tokens, targets)
    whole_result.loss.backward()

    torch.testing.assert_close(micro_result.loss, whole_result.loss.detach(), **TOL)
    for (name, a), b in zip(micro.named_parameters(), whole.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=name)


def test_loss_is_the_weighted_mean_of_pass_losses_and_merged_loss_is_per_position():
    args = tiny_args(lrt={"num_subsets": 3, "pass0_weight": 0.5})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=10)
    targets = sample_tokens(args, batch=2, T=10, seed=4)
    with torch.no_grad():
        result = run_schedule(model, tokens, targets)
    L = result.pass_losses
    torch.testing.assert_close(result.loss, (0.5 * L[0] + L[1] + L[2] + L[3]) / 3.5, **TOL)
    for i in range(3):
        torch.testing.assert_close(result.token_loss[:, i::3], result.pass_token_losses[1 + i], **TOL)
        torch.testing.assert_close(result.pass_positions[1 + i], torch.arange(i, 10, 3))
    torch.testing.assert_close(L[0], result.pass_token_losses[0].mean(), **TOL)


def test_kv_refresh_reprojects_the_feedback_exactly():
    """Without residual injection, layer 0's keys/values depend on the memory only
    through the feedback, so a refreshed group equals a fresh pass with that memory."""
    args = tiny_args(lrt={"num_subsets": 3, "residual_injection": False, "kv_refresh": True})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=12, bos_every=5)
    with torch.no_grad():
        buffer = SharedBuffer(model, tokens, model(tokens), 3, detach=True)
        buffer.refresh(0)
        memory = apply_reset(
            shift_right(buffer.merged_states()), memory_keep_mask(tokens, torch.arange(12), args.bos_token_id, True)
        )
        fresh = model(tokens, memory=memory).kv[0]
    for j in (1, 2):
        torch.testing.assert_close(buffer.keys[0][j], fresh.k[:, :, j::3], **TOL)
        torch.testing.assert_close(buffer.values[0][j], fresh.v[:, :, j::3], **TOL)


def test_kv_refresh_without_kv_feedback_changes_nothing():
    """Without K/V feedback there is nothing to re-project: kv_refresh leaves the step as it is
    (it used to call the absent feedback projection and crash)."""
    args = tiny_args(lrt={"num_subsets": 3, "kv_feedback": False})
    refreshing = args.replace(lrt=LRTArgs(**{**vars(args.lrt), "kv_refresh": True}))
    tokens = sample_tokens(args, batch=2, T=12, bos_every=5)
    targets = sample_tokens(args, batch=2, T=12, seed=3)
    plain = run_schedule(tiny_model(args), tokens, targets)
    refreshed = run_schedule(tiny_model(refreshing), tokens, targets)
    assert refreshing.lrt.kv_refresh and not refreshing.lrt.refreshes_kv
    assert torch.equal(refreshed.loss, plain.loss)
    assert torch.equal(refreshed.token_loss, plain.token_loss)


def test_buffers_and_layouts_follow_their_protocols():
    from titan_lrt.model.schedule import Buffer, Layout, WholeSequence
    from titan_lrt.parallel.context_parallel import ContextParallel, ContextParallelBuffer

    args = tiny_args(lrt={"num_subsets": 3})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=1, T=9)
    with torch.no_grad():
        assert isinstance(SharedBuffer(model, tokens, model(tokens), 3, detach=True), Buffer)
    assert isinstance(WholeSequence(), Layout)
    assert issubclass(ContextParallel, Layout)
    for method in ("select", "memory", "keys_for", "write", "refresh", "merge", "merged_states", "merged_kv"):
        assert callable(getattr(ContextParallelBuffer, method)), method


def test_subset_attention_cpu_kernel_matches_reference_math_with_gradients():
    from titan_lrt.model import attention

    torch.manual_seed(0)
    B, H, Hkv, D, T = 2, 4, 2, 8, 11
    for S in (1, 2, 3, 11):
        for i in range(S):
            n = len(range(i, T, S))
            q = torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True)
            ks = [
                torch.randn(B, Hkv, len(range(j, T, S)), D, dtype=torch.float64, requires_grad=True) for j in range(S)
            ]
            vs = [
                torch.randn(B, Hkv, len(range(j, T, S)), D, dtype=torch.float64, requires_grad=True) for j in range(S)
            ]
            out = attention.subset_attention(q, ks, vs, i)
            key_pos = torch.cat([torch.arange(j, T, S) for j in range(S)])
            mask = key_pos[None, :] <= torch.arange(i, T, S)[:, None]
            ref = torch.nn.functional.scaled_dot_product_attention(
                q, torch.cat(ks, 2).repeat_interleave(2, 1), torch.cat(vs, 2).repeat_interleave(2, 1), attn_mask=mask
            )
            torch.testing.assert_close(out, ref, **TOL)
            probe = torch.randn_like(out)
            got = torch.autograd.grad((out * probe).sum(), [q, *ks, *vs], allow_unused=True)
            want = torch.autograd.grad((ref * probe).sum(), [q, *ks, *vs], allow_unused=True)
            for g, w in zip(got, want):
                torch.testing.assert_close(g if g is not None else torch.zeros_like(w), w, **TOL)


def test_sliding_windows_in_subset_passes_match_the_recurrence():
    T = 10
    args = tiny_args(window_pattern="SL", short_window=3, lrt={"num_subsets": T})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=T)
    with torch.no_grad():
        result = run_schedule(model, tokens)
    logits, _ = sequential_recurrence(model, tokens)
    torch.testing.assert_close(result.logits, logits, **TOL)


def test_model_builds_on_meta_device_and_initialises():
    args = tiny_args()
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    tokens = sample_tokens(args, batch=1, T=6)
    assert torch.isfinite(model(tokens).logits).all()


def test_loss_denominators_replace_the_per_pass_means():
    """A data-parallel trainer divides each pass's summed loss by a global count."""
    args = tiny_args(lrt={"num_subsets": 2})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=10)
    targets = sample_tokens(args, batch=2, T=10, seed=3)
    with torch.no_grad():
        plain = run_schedule(model, tokens, targets)
        scaled = run_schedule(model, tokens, targets, loss_denominators=[40.0, 20.0, 20.0])
    sums = [t.sum() for t in plain.pass_token_losses]
    torch.testing.assert_close(scaled.loss, (sums[0] / 40 + sums[1] / 20 + sums[2] / 20) / 3, **TOL)
    torch.testing.assert_close(plain.loss, (sums[0] / 20 + sums[1] / 10 + sums[2] / 10) / 3, **TOL)


def test_pass_target_counts_by_hand():
    """Two micro-batches of 2 x 7 targets, some ignored; counts per pass written out by hand."""
    I = IGNORE_INDEX  # noqa: E741
    targets = torch.tensor(
        [
            [
                [5, I, 5, 5, I, 5, 5],  # positions 1, 4 ignored
                [I, 5, 5, 5, 5, 5, I],
            ],  # positions 0, 6 ignored
            [[5, 5, 5, 5, 5, 5, 5], [I, I, I, I, I, I, I]],  # a row of padding
        ]
    )
    # scored per position over all rows: [2, 2, 3, 3, 2, 3, 2], 17 in all
    interleaved = pass_target_counts(LRTArgs(mode="interleaved", num_subsets=3), targets)
    assert interleaved.dtype == torch.float64
    assert interleaved.tolist() == [17.0, 2 + 3 + 2, 2 + 2, 3 + 3]  # P_0 = {0, 3, 6}, P_1 = {1, 4}, P_2 = {2, 5}
    assert pass_target_counts(LRTArgs(mode="interleaved", num_subsets=2), targets).tolist() == [17.0, 9.0, 8.0]
    assert pass_target_counts(LRTArgs(mode="jacobi", jacobi_passes=3), targets).tolist() == [17.0] * 3
    assert pass_target_counts(LRTArgs(mode="off"), targets).tolist() == [17.0]


@pytest.mark.parametrize(
    "lrt",
    [
        {"mode": "interleaved", "num_subsets": 4},
        {"mode": "interleaved", "num_subsets": 5},
        {"mode": "jacobi", "jacobi_passes": 2},
        {"mode": "off"},
    ],
)
def test_pass_target_counts_equal_the_scored_targets_each_pass_computes(lrt):
    """Against a plain loop over the positions each pass of a real step computes (`pass_positions`
    of the StepResult), on random targets with ignored positions."""
    args = tiny_args(lrt=lrt)
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=3, T=13)
    targets = sample_tokens(args, batch=3, T=13, seed=4)
    targets[torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)) < 0.3] = IGNORE_INDEX
    with torch.no_grad():
        result = run_schedule(model, tokens, targets)
    expected = [
        float(sum(int(targets[b, t]) != IGNORE_INDEX for b in range(3) for t in positions.tolist()))
        for positions in result.pass_positions
    ]
    assert pass_target_counts(args.lrt, targets).tolist() == expected
    assert len(expected) == args.lrt.num_passes


def test_lrt_args_describe_the_shape_of_a_step():
    s3 = LRTArgs(mode="interleaved", num_subsets=3)
    assert (s3.num_passes, s3.pass_names, s3.pass_shapes, s3.describe()) == (
        4,
        ["pass0", "subset0", "subset1", "subset2"],
        4,
        "interleaved S=3",
    )
    assert s3.pass_positions(7) == [range(7), range(0, 7, 3), range(1, 7, 3), range(2, 7, 3)]
    k3 = LRTArgs(mode="jacobi", jacobi_passes=3)
    assert (k3.num_passes, k3.pass_names, k3.pass_shapes, k3.describe()) == (
        3,
        ["pass0", "jacobi1", "jacobi2"],
        2,
        "jacobi K=3",
    )
    assert k3.pass_positions(5) == [range(5)] * 3
    off = LRTArgs(mode="off", num_subsets=3, jacobi_passes=3)
    assert (off.num_passes, off.pass_names, off.pass_shapes, off.describe()) == (1, ["pass0"], 1, "off")
    assert LRTArgs(mode="jacobi", jacobi_passes=1).pass_shapes == 1
    assert LRTArgs(mode="interleaved", kv_refresh=True).refreshes_kv
    assert not LRTArgs(mode="interleaved", kv_refresh=True, kv_feedback=False).refreshes_kv
    assert not LRTArgs(mode="jacobi", kv_refresh=True).refreshes_kv


@pytest.mark.parametrize("window_pattern", ["L", "SL"])
def test_flex_attention_backend_matches_sdpa_in_the_forward(window_pattern):
    """The GPU path (FlexAttention block masks), checked forward-only on CPU."""
    args = tiny_args(window_pattern=window_pattern, short_window=4, lrt={"num_subsets": 3})
    sdpa = tiny_model(args.replace(attention_backend="sdpa"))
    flex = tiny_model(args.replace(attention_backend="flex"))
    tokens = sample_tokens(args, batch=2, T=12, bos_every=5)
    with torch.no_grad():
        a, b = run_schedule(sdpa, tokens), run_schedule(flex, tokens)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-7, atol=1e-8)
