"""Decoding benchmark: recurrent (LRT) decoding against the baseline's, side by side in one process.

    python tools/bench_decode.py                                  # debug model and dim 256, batch 1 and 8
    python tools/bench_decode.py --dims 128 --batch 1 --rounds 40 --threads 1
    python tools/bench_decode.py --config train_configs/lrt_d12.toml --dims 0 --vocab 32768 --device cuda
    python tools/bench_decode.py --config train_configs/lrt_d12.toml --dims 0 --vocab 32768 --dtype bf16 --compile
    python tools/bench_decode.py --config train_configs/lrt_d12.toml --dims 0 --vocab 32768 --dtype bf16 --compile \
        --cuda-graphs

Both models have the backbone of --config (default: train_configs/debug_model.toml:
4 layers, dim 128, 2 heads), resized by each of --dims (0: the config's own
dim) and a vocabulary of --vocab tokens; the LRT model has the config's [lrt]
section, the baseline has lrt.mode = "off". Each measurement prefills a prompt
(untimed) and then times --new-tokens greedy steps of the decoding loop of
`titan_lrt.model.decoding.generate` (sample, then `decode_step`, which carries
the KV cache and, for the LRT, the exact memory s_{t-1}). Rounds alternate
between the two models, so that the noise of a shared machine hits both alike;
the medians and their ratio are reported. Decoding is the same for every LRT
training schedule (interleaved, Jacobi): only the pathway's shape matters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch._dynamo
from tqdm import tqdm

from titan_lrt.config import ConfigError, load_config
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.decoding import compile_decode_step, decode_step, prefill, sample
from titan_lrt.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args: ModelArgs, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    with torch.no_grad():  # move the zero-initialised projections, as training would
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def time_decoding(model: Transformer, prompts: list[list[int]], new_tokens: int, sync) -> float:
    """Seconds for `new_tokens` steps of greedy decoding after the (untimed) prefill."""
    state, logits = prefill(model, prompts, "zero", len(prompts[0]) + new_tokens)
    active = torch.ones(len(prompts), dtype=torch.bool, device=logits.device)
    sync()
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = sample(logits, 0.0, None, None)
        logits = decode_step(model, state, token, active=active)
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="train_configs/debug_model.toml", help="default: %(default)s")
    p.add_argument("--dims", type=int, nargs="+", default=[0, 256], help="model dims (0: the config's; default: 0 256)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--vocab", type=int, default=8192, help="default: %(default)s")
    p.add_argument("--prompt-len", type=int, default=16, help="default: %(default)s")
    p.add_argument("--new-tokens", type=int, default=64, help="timed decoding steps per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=20, help="default: %(default)s")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and cache (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="compile each model's whole decode step (warm-up compiles)")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="with --compile on CUDA: replay each step as a CUDA graph"
    )
    p.add_argument("--json", help="also write the rows as JSON to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.cuda_graphs and not (a.compile and device.type == "cuda"):
        p.error("--cuda-graphs needs --compile and --device cuda")
    torch._dynamo.config.recompile_limit = 64  # every model and batch size is a graph of the one step function
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        config, _ = load_config(["--config", a.config])
    except ConfigError as err:
        p.error(str(err))
    base_args = config.model_args(a.vocab, 0).replace(max_seq_len=a.prompt_len + a.new_tokens)
    if not base_args.lrt.enabled:
        p.error(f"{a.config} has lrt.mode='off': give an LRT config")

    rows = []
    cases = [(dim, batch) for dim in a.dims for batch in a.batch]
    progress = tqdm(total=len(cases) * (a.warmup + a.rounds), desc="decode rounds", unit="round")
    for dim, batch in cases:
        lrt_args = base_args.replace(dim=dim) if dim else base_args
        models = {"baseline": build(lrt_args.replace(lrt=LRTArgs(mode="off")), device), "LRT": build(lrt_args, device)}
        for model in models.values():
            model.to(DTYPES[a.dtype]).init_buffers()  # RoPE tables stay fp32
            if a.compile:
                compile_decode_step(model, cuda_graphs=a.cuda_graphs)
        g = torch.Generator().manual_seed(batch)
        prompts = [[0] + torch.randint(1, a.vocab, (a.prompt_len - 1,), generator=g).tolist() for _ in range(batch)]
        times = {name: [] for name in models}
        for r in range(a.warmup + a.rounds):
            for name, model in models.items():
                seconds = time_decoding(model, prompts, a.new_tokens, sync)
                if r >= a.warmup:
                    times[name].append(seconds)
            progress.update()
        tokens = batch * a.new_tokens
        speed = {name: tokens / statistics.median(t) for name, t in times.items()}
        rows.append((lrt_args, batch, speed["baseline"], speed["LRT"]))
    progress.close()

    lrt = base_args.lrt
    print(
        f"decode benchmark: {a.config} (LRT: {lrt.projection} projection, inject {lrt.inject_layers}, "
        f"value_embeds {base_args.value_embeds}), vocab {a.vocab}, prompt {a.prompt_len}, {a.new_tokens} new tokens, "
        f"{a.dtype}{', compiled step' if a.compile else ''}{', CUDA graphs' if a.cuda_graphs else ''}, "
        f"{device.type}, {torch.get_num_threads()} threads, "
        f"median of {a.rounds} alternating rounds"
    )
    print(f"{'dim':>5}{'layers':>7}{'heads':>6}{'batch':>6}{'baseline tok/s':>16}{'LRT tok/s':>12}{'LRT/baseline':>14}")
    for args, batch, base, rec in rows:
        print(f"{args.dim:>5}{args.n_layers:>7}{args.n_heads:>6}{batch:>6}{base:>16.1f}{rec:>12.1f}{rec / base:>14.3f}")
    if a.json:
        records = [
            {
                "dim": args.dim,
                "layers": args.n_layers,
                "batch": batch,
                "baseline_tokens_per_s": base,
                "lrt_tokens_per_s": rec,
            }
            for args, batch, base, rec in rows
        ]
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
