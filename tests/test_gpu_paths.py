"""The GPU code paths, tested on CPU where a CPU test can exist: compute dtypes under
bf16 autocast, the log-sum-exp merge of attention blocks, float8 on ragged row
counts, compiled training/evaluation/decoding, FlexAttention block masks built once
per shape outside the compiled blocks (forward only), selective checkpointing saving
FlexAttention, the feedback projection compiled by inductor, the CPU fallback of
CUDA-graph decoding, and the FLOP conventions of MFU.

Not testable here (no GPU in CI): the CUDA attention kernels' own log-sum-exp
(`_scaled_dot_product_flash_attention` / `_efficient_attention`), FlexAttention's
compiled kernels and backward (and the recompute-free backward under selective
checkpointing), real float8 `_scaled_mm` and its fusion with the compiled feedback
projection, CUDA-graph replay of the decode step (`compile_decode_step(...,
cuda_graphs=True)`: static caches, copied outputs) and the decode ratio on a GPU;
tools/bench_gpu.sh exercises them on a GPU machine."""

import pytest
import torch
import torch.nn.functional as F

from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer


def _args(**kw) -> ModelArgs:
    lrt = kw.pop("lrt", {"mode": "interleaved", "num_subsets": 2})
    base = {"vocab_size": 128, "n_layers": 2, "dim": 64, "n_heads": 2, "max_seq_len": 64, "value_embeds": "all"}
    return ModelArgs(**{**base, **kw}, lrt=LRTArgs(**lrt))


def _model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():  # move the zero-initialised projections so every path matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _tokens(B=2, T=32, seed=1):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def test_kv_buffer_stays_in_the_compute_dtype_under_bf16_autocast(monkeypatch):
    """CUDA autocast runs rms_norm in fp32; the keys and values kept for the subset
    passes must still be bf16 (half the memory and bandwidth of fp32)."""
    rms_norm = F.rms_norm

    def fp32_rms_norm(x, shape, *args, **kwargs):  # what CUDA autocast does to rms_norm
        if torch.is_autocast_enabled("cpu"):
            x = x.float()
        return rms_norm(x, shape, *args, **kwargs)

    monkeypatch.setattr(F, "rms_norm", fp32_rms_norm)
    model = _model(_args(lrt={"mode": "interleaved", "num_subsets": 2, "kv_refresh": True}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.rms_norm(torch.ones(2, 4, dtype=torch.bfloat16), (4,)).dtype == torch.float32  # reproduced
        result = run_schedule(model, _tokens(), return_kv=True)
    for layer, (k, v) in enumerate(result.kv):
        assert (k.dtype, v.dtype) == (torch.bfloat16, torch.bfloat16), f"layer {layer}: {k.dtype}, {v.dtype}"


def _matmul_params(model: Transformer, skip: str = "\0") -> int:
    """N of the published formula: weights that multiply activations (no embedding
    tables, no scalars)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and skip not in n)


@pytest.mark.parametrize("pattern", ["L", "SSSL"])
def test_published_flops_are_6n_plus_12lhqt_per_full_pass(pattern):
    from titan_lrt.model.accounting import published_step_flops

    T = 32
    base = _args(window_pattern=pattern, short_window=8, lrt={"mode": "off"})
    L, H, Q = base.n_layers, base.n_heads, base.head_dim
    keys = sum(min(base.window(layer) or T, T) for layer in range(L))
    assert keys == {"L": 2 * T, "SSSL": 8 + T}[pattern]  # two layers; the last one always sees everything
    model = Transformer(base)
    assert published_step_flops(base, T) == 6 * _matmul_params(model) + 12 * H * Q * keys

    lrt = _args(window_pattern=pattern, short_window=8)  # pass 0 + the subset passes: two full passes
    model = Transformer(lrt)
    n_layers, n_feedback = _matmul_params(model, skip="feedback"), model.feedback.proj.weight.numel()
    assert published_step_flops(lrt, T) == 2 * (6 * n_layers + 12 * H * Q * keys) + 6 * n_feedback


def test_peak_table_tells_the_sxm_pcie_and_nvl_parts_apart():
    from titan_lrt.metrics import format_step_line, peak_flops_of

    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H200 NVL": 835e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100-PCIE-40GB": 312e12,
        "NVIDIA B200": 2250e12,
        "NVIDIA GeForce GTX 1080": None,
    }
    assert {name: peak_flops_of(name) for name in names} == names
    line = format_step_line(
        3,
        {
            "loss/total": 2.0,
            "throughput/tokens_per_s": 1e5,
            "throughput/mfu_pct": 40.0,
            "throughput/mfu_published_pct": 52.5,
            "optim/lr": 1e-3,
            "optim/grad_norm": 1.0,
        },
    )
    assert "mfu 40.0%" in line and "published convention 52.5%" in line


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_linears_take_any_row_count(recipe, monkeypatch):
    """A subset pass has B x T/S rows (11, 11 and 10 here); `_scaled_mm` needs a
    multiple of 16. Padded rows change neither outputs nor gradients."""
    from torchao.float8.float8_linear import Float8Linear

    from titan_lrt.parallel.float8 import apply_float8

    model = _model(_args(dim=64, lrt={"mode": "interleaved", "num_subsets": 3}))
    converted = apply_float8(model, recipe=recipe, emulate=True, fsdp=False)
    assert "feedback.proj" in converted
    rows_seen = []
    forward = Float8Linear.forward

    def spy(self, x):
        rows_seen.append(x.numel() // x.size(-1))
        return forward(self, x)

    monkeypatch.setattr(Float8Linear, "forward", spy)
    run_schedule(model, _tokens(B=1, T=32), _tokens(B=1, T=32, seed=2), backward=lambda loss, last: loss.backward())
    assert rows_seen and all(r % 16 == 0 for r in rows_seen), sorted(set(rows_seen))

    linear = model.layers[0].attention.wq
    x = torch.randn(1, 11, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).float()
    x_pad, x_raw = x.clone().requires_grad_(), x.clone().requires_grad_()
    # padded vs the unpadded float8 matmul: the same quantisation, only the summation order differs
    out_pad, out_raw = linear(x_pad), forward(linear, x_raw)
    torch.testing.assert_close(out_pad, out_raw, rtol=1e-5, atol=1e-6)
    linear.weight.grad = None
    out_pad.square().sum().backward()
    grad_pad, linear.weight.grad = linear.weight.grad, None
    out_raw.square().sum().backward()
    torch.testing.assert_close(grad_pad, linear.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_pad.grad, x_raw.grad, rtol=1e-5, atol=1e-6)


def test_compiled_sliding_window_model_trains_evaluates_and_decodes_without_hitting_the_recompile_limit(monkeypatch):
    """nanochat's SSSL windows with alternating value embeddings: two block kinds x
    (three training passes, three evaluation passes, the decode step) = 14 graphs of
    Block.forward, more than Dynamo's default limit of 8 (FailOnRecompileLimitHit
    under fullgraph before the limit was sized from the block kinds). aot_eager
    traces exactly what inductor would compile; tests/test_speed_features.py
    checks inductor's numerics."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from titan_lrt.model.decoding import generate_tokens
    from titan_lrt.parallel.compile import apply_compile, block_kinds

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    args = _args(window_pattern="SSSL", short_window=8, value_embeds="alternate")
    eager, compiled = _model(args), _model(args)
    apply_compile(compiled, backend="aot_eager")
    assert block_kinds(compiled) == 2
    tokens, targets = _tokens(), _tokens(seed=2)
    counters.clear()
    for step in range(2):
        for model in (compiled, eager):
            model.zero_grad(set_to_none=True)
            result = run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward())
            if model is compiled:
                loss_c = result.loss.detach()
                grads = {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters()}
        torch.testing.assert_close(loss_c, result.loss.detach(), rtol=1e-5, atol=1e-5)
        for name, p in eager.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled in the second training step"
    with torch.no_grad():
        losses = [run_schedule(m, tokens, targets).loss for m in (compiled, eager)]
    torch.testing.assert_close(*losses, rtol=1e-5, atol=1e-5)
    prompts = [[1, 5, 9, 2], [1, 7]]
    for mode in ("exact", "schedule"):
        decoded = [generate_tokens(m, prompts, 6, temperature=0.0, prefill_mode=mode) for m in (compiled, eager)]
        assert decoded[0] == decoded[1], mode


class _MathKernel:
    """A third `BlockKernel` provider, written from the flash-attention equations in
    float64: what CUDA's flash kernel computes (it cannot run here)."""

    @staticmethod
    def _probs(q, k, lse, causal):
        scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        return scores if lse is None else torch.exp(scores - lse.unsqueeze(-1))

    @classmethod
    def forward(cls, q, k, v, causal):
        scores = cls._probs(q, k, None, causal)
        lse = torch.logsumexp(scores, dim=-1)
        return torch.softmax(scores, dim=-1) @ v, lse, ()

    @classmethod
    def backward(cls, grad_out, q, k, v, out, lse, causal, saved):
        p = cls._probs(q, k, lse, causal)  # with the merged lse: this block's share of the merged softmax
        dp = grad_out @ v.transpose(-1, -2)
        ds = p * (dp - (grad_out * out).sum(-1, keepdim=True)) / q.size(-1) ** 0.5
        return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ grad_out


@pytest.mark.parametrize("provider", ["cpu_flash", "math"])
@pytest.mark.parametrize("S,T", [(2, 16), (3, 17)])
def test_block_kernel_merge_is_exact_attention_in_float64(provider, S, T, monkeypatch):
    """Subset attention through a BlockKernel provider against a literal masked
    softmax over positions: outputs and gradients in float64."""
    from titan_lrt.model import attention

    if provider == "math":
        math_kernel = attention.BlockKernel(_MathKernel.forward, _MathKernel.backward)
        monkeypatch.setitem(attention.BLOCK_KERNELS, "cpu", math_kernel)
    g = torch.Generator().manual_seed(S * T)
    B, H, Hkv, D = 2, 4, 2, 8
    k_all = torch.randn(B, Hkv, T, D, dtype=torch.float64, generator=g)
    v_all = torch.randn(B, Hkv, T, D, dtype=torch.float64, generator=g)
    for index in range(S):
        n = len(range(index, T, S))
        q = torch.randn(B, H, n, D, dtype=torch.float64, generator=g).requires_grad_()
        kv = [t.clone().requires_grad_() for t in (k_all, v_all)]
        keys = [kv[0][:, :, j::S] for j in range(S)]
        values = [kv[1][:, :, j::S] for j in range(S)]
        out = attention.subset_attention(q, keys, values, index, backend="sdpa")

        q_ref = q.detach().clone().requires_grad_()
        kv_ref = [t.clone().requires_grad_() for t in (k_all, v_all)]
        k_ref, v_ref = (t.repeat_interleave(H // Hkv, dim=1) for t in kv_ref)
        q_pos, k_pos = torch.arange(index, T, S), torch.arange(T)
        scores = (q_ref @ k_ref.transpose(-1, -2) / D**0.5).masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        ref = torch.softmax(scores, dim=-1) @ v_ref
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

        grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
        out.backward(grad)
        ref.backward(grad)
        for got, want, name in zip((q, *kv), (q_ref, *kv_ref), "qkv"):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10, msg=f"d{name}, pass {index}")


def test_compiled_decode_step_gives_the_eager_tokens_and_logits():
    """The LRT's step (the baseline's is the same function without the memory), traced whole into
    one graph; aot_eager keeps the suite short (inductor's code for these ops is checked by the
    compiled-blocks test, and on a GPU by tools/bench_gpu.sh)."""
    from titan_lrt.model.decoding import compile_decode_step, decode_step, prefill, sample

    args = _args()
    eager, compiled = _model(args), _model(args)
    compile_decode_step(compiled, backend="aot_eager")
    prompts = [[1, 5, 9, 2, 7], [1, 7]]
    runs = []
    for model in (eager, compiled):
        state, logits = prefill(model, prompts, "exact", 12)
        tokens, all_logits = [], [logits]
        for _ in range(5):
            token = sample(logits, 0.0, None, None)
            logits = decode_step(model, state, token)
            tokens.append(token)
            all_logits.append(logits)
        runs.append((torch.stack(tokens), torch.stack(all_logits), state))
    (tok_e, log_e, st_e), (tok_c, log_c, st_c) = runs
    assert torch.equal(tok_e, tok_c)
    torch.testing.assert_close(log_c, log_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st_c.last_state, st_e.last_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(st_c.lengths, st_e.lengths)
    for k_c, k_e in zip(st_c.keys, st_e.keys):
        torch.testing.assert_close(k_c, k_e, rtol=1e-4, atol=1e-4)


def _count_mask_builds(monkeypatch) -> list[int]:
    import torch.nn.attention.flex_attention as flex_attention

    builds, create = [0], flex_attention.create_block_mask

    def counted(*args, **kwargs):
        builds[0] += 1
        return create(*args, **kwargs)

    monkeypatch.setattr(flex_attention, "create_block_mask", counted)
    return builds


def test_flex_block_masks_are_built_once_per_shape_outside_the_compiled_blocks(monkeypatch):
    """FlexAttention (CUDA's subset and window attention; forward only on CPU): the
    model builds each mask shape once and hands it to the compiled blocks, which would
    refuse to build one inside their graph. Logits equal the SDPA path's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from titan_lrt.parallel.compile import apply_compile

    builds = _count_mask_builds(monkeypatch)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)  # other tests' block graphs share the code
    args = _args(n_layers=1, attention_backend="flex")
    flex, sdpa = _model(args), _model(args.replace(attention_backend="sdpa"))
    apply_compile(flex, backend="aot_eager")
    tokens = _tokens()
    counters.clear()
    with torch.no_grad():
        for step in range(2):
            got, want = run_schedule(flex, tokens), run_schedule(sdpa, tokens)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled in the second step"
    assert builds[0] == flex.block_masks.built == 2  # subset passes 0 and 1; pass 0 is plain causal SDPA

    # Attention asked for a FlexAttention mask inside a compiled graph refuses to build one.
    from titan_lrt.model.attention import subset_attention

    q, groups = torch.randn(1, 2, 4, 8), [torch.randn(1, 2, 4, 8) for _ in range(2)]
    attend = torch.compile(
        lambda q, k: subset_attention(q, k, k, 0, backend="flex"), backend="aot_eager", fullgraph=True
    )
    with pytest.raises(Exception, match="built outside"):
        attend(q, groups)

    # Many layers, eager: still one mask per (pass kind, window), not per layer or step.
    builds[0] = 0
    deep = _model(_args(n_layers=4, window_pattern="SSSL", short_window=8, attention_backend="flex"))
    with torch.no_grad():
        for _ in range(2):
            run_schedule(deep, tokens)
    # pass 0 with window 8; subset passes 0 and 1 with windows 8 and 0 (full-length pass 0: SDPA)
    assert builds[0] == deep.block_masks.built == 5


def test_selective_checkpointing_saves_flex_attention(monkeypatch):
    """The "op" policy sees FlexAttention's higher-order op inside a checkpointed block
    and saves its output (forward only: FlexAttention has no CPU backward, so the
    device check that refuses inputs requiring gradients is lifted for the forward)."""
    import torch.nn.attention.flex_attention as flex_attention

    from titan_lrt.parallel import activation_checkpoint

    decisions = {}
    policy = activation_checkpoint._save_matmuls

    def spy(ctx, op, *args, **kwargs):
        decisions[op] = policy(ctx, op, *args, **kwargs)
        return decisions[op]

    monkeypatch.setattr(activation_checkpoint, "_save_matmuls", spy)
    monkeypatch.setattr(flex_attention, "_validate_device", lambda *args: None)
    model = _model(_args(n_layers=1, value_embeds="none", attention_backend="flex"))
    activation_checkpoint.apply_activation_checkpointing(model, mode="selective", selective_option="op")
    run_schedule(model, _tokens(), _tokens(seed=2))
    save = activation_checkpoint.CheckpointPolicy.MUST_SAVE
    assert decisions[torch.ops.higher_order.flex_attention] == save
    assert decisions[torch.ops.aten.mm.default] == save
    assert activation_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE in decisions.values()  # element-wise work


def test_compiled_feedback_projection_matches_eager_and_does_not_recompile(monkeypatch):
    """Inductor (the backend whose alias replay crashed on the projection's views): a
    layerwise projection with K/V refresh over ragged subsets (11, 11, 10 positions)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from titan_lrt.parallel.compile import compile_feedback

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    args = _args(lrt={"mode": "interleaved", "num_subsets": 3, "projection": "layerwise", "kv_refresh": True})
    eager, compiled = _model(args), _model(args)
    compile_feedback(compiled, "inductor")
    tokens, targets = _tokens(T=32), _tokens(T=32, seed=2)
    counters.clear()
    for step in range(3):
        runs = []
        for model in (compiled, eager):
            model.zero_grad(set_to_none=True)
            loss = run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward()).loss
            runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (loss_c, grads_c), (loss_e, grads_e) = runs
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 2  # subsets of 11 and 10 positions
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the first step"


def test_cuda_graph_decoding_is_opt_in_for_cuda_and_falls_back_to_the_compiled_step_elsewhere():
    """CUDA graphs ("reduce-overhead") only when asked for on CUDA with inductor; on CPU the
    plain compiled step of the baseline model (the same step function as the LRT's) gives the
    eager tokens. The CUDA-graph wrapper's bookkeeping (static caches, outputs copied out of
    the graph's pool) runs here around the eager step; the replay itself needs a GPU."""
    from titan_lrt.model import decoding

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decoding.decode_compile_options(cuda, "inductor", True) == {"mode": "reduce-overhead"}
    assert decoding.decode_compile_options(cuda, "inductor", False) == {}
    assert decoding.decode_compile_options(cpu, "inductor", True) == {}
    with pytest.raises(ValueError, match="needs the inductor backend"):
        decoding.decode_compile_options(cuda, "aot_eager", True)

    args = _args(lrt={"mode": "off"})
    eager, compiled, graphed = _model(args), _model(args), _model(args)
    decoding.compile_decode_step(compiled, backend="aot_eager", cuda_graphs=True)
    decoding._COMPILED_STEPS[graphed] = decoding._graphed(decoding._step)
    prompts = [[1, 5, 9, 2], [1, 7]]
    runs = [decoding.generate_tokens(m, prompts, 6, temperature=0.0) for m in (eager, compiled, graphed)]
    assert runs[0] == runs[1] == runs[2]
    assert decoding._COMPILED_STEPS[compiled] is not decoding._step
