"""KV-cache decoding with true recurrence against naive full recomputation (fp64)."""

import pytest
import torch
from lrt_reference import sample_tokens, sequential_recurrence, tiny_args, tiny_model

from titan_lrt.model.decoding import decode_step, generate, generate_tokens, prefill, sample
from titan_lrt.model.schedule import run_schedule

TOL = dict(rtol=1e-9, atol=1e-10)


def _prompts(args):
    """Ragged prompts, one with a document start in the middle."""
    tokens = sample_tokens(args, batch=3, T=9, seed=11)
    prompts = [tokens[0, :9].tolist(), tokens[1, :5].tolist(), tokens[2, :7].tolist()]
    prompts[0][0] = prompts[1][0] = prompts[2][0] = args.bos_token_id
    prompts[0][4] = args.bos_token_id
    return prompts


def _greedy_reference(model, prompt, steps, zero_prompt_memory):
    """Greedy continuation where every step recomputes the whole sequence from scratch."""
    seq = list(prompt)
    for _ in range(steps):
        logits, _ = sequential_recurrence(
            model, torch.tensor([seq]), zero_memory_until=len(prompt) if zero_prompt_memory else 0
        )
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("mode", ["exact", "zero", "schedule"])
@pytest.mark.parametrize("lrt", ["interleaved", "off"])
def test_greedy_batch_decoding_equals_full_recompute(mode, lrt):
    prompt_len = 9
    args = tiny_args(lrt={"mode": lrt, "num_subsets": prompt_len})  # schedule prefill with S = T is exact
    model = tiny_model(args)
    prompts = _prompts(args)
    steps = 6
    got = generate_tokens(model, prompts, steps, temperature=0.0, prefill_mode=mode)
    for prompt, tokens in zip(prompts, got):
        if mode == "schedule" and len(prompt) != prompt_len:
            continue  # S = T only makes the longest prompt exact; ragged ones are checked below
        assert tokens == _greedy_reference(model, prompt, steps, zero_prompt_memory=(mode == "zero")), prompt


def test_decode_logits_equal_the_recurrence_step_by_step():
    args = tiny_args(value_embeds="all", lrt={"kv_refresh": True})
    model = tiny_model(args)
    tokens = sample_tokens(args, batch=2, T=10, bos_every=6)
    logits, states = sequential_recurrence(model, tokens)
    state, first = prefill(model, [tokens[0, :3].tolist(), tokens[1, :3].tolist()], "exact", max_len=10)
    torch.testing.assert_close(first, logits[:, 2], **TOL)
    for t in range(3, 10):
        step_logits = decode_step(model, state, tokens[:, t])
        torch.testing.assert_close(step_logits, logits[:, t], **TOL)
        torch.testing.assert_close(state.last_state, states[:, t], **TOL)


def test_schedule_prefill_continues_from_the_merged_state():
    """S = 2 prefill: the first logits are the schedule's merged logits, and decoding
    afterwards equals decoding from a freshly rebuilt schedule cache each step."""
    args = tiny_args(lrt={"num_subsets": 2})
    model = tiny_model(args)
    prompts = _prompts(args)
    state, first = prefill(model, prompts, "schedule", max_len=16)
    for b, p in enumerate(prompts):
        merged = run_schedule(model, torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(first[b], merged, **TOL)
    continuation = generate_tokens(model, prompts, 5, temperature=0.0, prefill_mode="schedule")
    for b, p in enumerate(prompts):
        seq = []
        for _ in range(5):  # rebuild everything from the prompt at every step
            s, logits = prefill(model, [p], "schedule", max_len=16)
            for t in seq:
                logits = decode_step(model, s, torch.tensor([t]))
            seq.append(int(logits[0].argmax()))
        assert continuation[b] == seq


def test_ragged_stop_and_seeded_sampling():
    args = tiny_args()
    model = tiny_model(args)
    prompts = _prompts(args)
    free = generate_tokens(model, prompts, 8, temperature=0.0)
    stop = free[1][2]
    stopped = generate_tokens(model, prompts, 8, temperature=0.0, stop_tokens=[stop])
    for full, cut in zip(free, stopped):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert cut == expected
    assert len(stopped[1]) == free[1].index(stop) + 1 <= 3
    a = generate_tokens(model, prompts, 6, temperature=1.0, top_k=5, seed=123)
    b = generate_tokens(model, prompts, 6, temperature=1.0, top_k=5, seed=123)
    assert a == b
    streamed = [tok.tolist() for tok, _ in generate(model, prompts, 3, temperature=0.0)]
    assert [list(col) for col in zip(*streamed)] == [f[:3] for f in free]


def test_top_p_samples_only_the_nucleus_with_renormalised_probabilities():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p = 0.7 keeps the first two (0.5 < 0.7 before the
    second, 0.8 >= 0.7 before the third), sampled as 0.625 / 0.375; top_k = 1 keeps only the first."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log().expand(4000, 4)
    drawn = sample(logits, 1.0, None, torch.Generator().manual_seed(0), top_p=0.7)
    counts = torch.bincount(drawn, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03
    assert sample(logits, 1.0, 1, torch.Generator().manual_seed(0), top_p=0.99).unique().tolist() == [0]
    every = sample(logits, 1.0, None, torch.Generator().manual_seed(0), top_p=1.0)
    assert set(every.unique().tolist()) == {0, 1, 2, 3}
    assert sample(logits[:1], 0.0, None, None, top_p=0.1).tolist() == [0]  # greedy ignores top-p


def test_a_shared_generator_continues_one_stream_over_calls():
    args = tiny_args()
    model = tiny_model(args)
    prompts = _prompts(args)
    seeded = generate_tokens(model, prompts, 5, temperature=1.0, top_p=0.9, seed=7)
    generator = torch.Generator().manual_seed(7)
    assert generate_tokens(model, prompts, 5, temperature=1.0, top_p=0.9, generator=generator) == seeded
    # the same generator goes on where the first call stopped: a second call differs from a fresh seed
    assert generate_tokens(model, prompts, 5, temperature=1.0, top_p=0.9, generator=generator) != seeded


def test_bad_prefill_mode_and_overlong_generation_are_rejected():
    args = tiny_args()
    model = tiny_model(args)
    with pytest.raises(ValueError, match="prefill mode 'fast'"):
        prefill(model, [[1, 2]], "fast", max_len=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_tokens(model, [[1, 2]], args.max_seq_len)
