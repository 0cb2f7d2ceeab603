"""Training-step benchmark: the baseline and LRT variants side by side in one process.

The variants run in alternation (round-robin, one step each per round), so that
the noise of a shared machine hits them alike; the ratios to the baseline are
the numbers to read. Peak memory is measured on a separate, untimed step.

    python tools/bench_step.py                     # reference config of BENCHMARKS.md
    python tools/bench_step.py --rounds 10 --variants baseline s2 s4 jacobi2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import torch

from titan_lrt.cpu_allocator import keep_freed_memory
from titan_lrt.model.accounting import step_flops
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer

VARIANTS = {
    "baseline": dict(mode="off"),
    "s2": dict(mode="interleaved", num_subsets=2),
    "s4": dict(mode="interleaved", num_subsets=4),
    "s2_refresh": dict(mode="interleaved", num_subsets=2, kv_refresh=True),
    "s2_detach": dict(mode="interleaved", num_subsets=2, detach_buffer=True),
    "jacobi2": dict(mode="jacobi", jacobi_passes=2),
}


def peak_memory(fn, model) -> int:
    """Peak bytes allocated while fn runs, parameters included.

    CUDA: the allocator's own peak. CPU: the profiler's allocation events carry
    the allocator's running total of what was allocated since profiling began;
    its maximum plus the parameters and buffers alive before is the peak.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    allocated = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return resident + max(allocated, default=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["baseline", "s2", "s4"], choices=sorted(VARIANTS))
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()

    device = torch.device(a.device)
    if device.type == "cpu":
        keep_freed_memory()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    tokens = torch.randint(1, a.vocab, (a.batch, a.seq_len), device=device)
    targets = torch.randint(1, a.vocab, (a.batch, a.seq_len), device=device)

    models = {}
    for name in a.variants:
        args = ModelArgs(
            vocab_size=a.vocab, n_layers=a.n_layers, dim=a.dim, n_heads=a.n_heads, max_seq_len=a.seq_len,
            lrt=LRTArgs(**VARIANTS[name]),
        )
        torch.manual_seed(0)
        model = Transformer(args).to(device)
        model.init_weights()
        models[name] = model

    def step(model):
        model.zero_grad(set_to_none=True)
        with autocast:
            run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name, model in models.items():
        for _ in range(a.warmup):
            step(model)
    times = {name: [] for name in models}
    faults = {name: 0 for name in models}
    for _ in range(a.rounds):
        for name, model in models.items():
            sync()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(model)
            sync()
            times[name].append(time.perf_counter() - t0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    peaks = {name: peak_memory(lambda m=model: step(m), model) for name, model in models.items()}

    print(
        f"config: dim {a.dim}, layers {a.n_layers}, heads {a.n_heads}, seq {a.seq_len}, batch {a.batch}, "
        f"vocab {a.vocab}, {a.dtype} autocast, eager, {device.type}, threads {torch.get_num_threads()}, "
        f"{a.rounds} rounds"
    )
    base = a.variants[0]
    print(
        f"{'variant':<12}{'median s':>10}{'min s':>9}{'ratio':>8}{'flop ratio':>12}{'peak MiB':>10}{'mem ratio':>11}"
        f"{'faults/step':>13}"
    )
    for name in models:
        med = statistics.median(times[name])
        flops = step_flops(models[name].args, a.seq_len).total / step_flops(models[base].args, a.seq_len).total
        print(
            f"{name:<12}{med:>10.3f}{min(times[name]):>9.3f}{med / statistics.median(times[base]):>8.3f}"
            f"{flops:>12.3f}{peaks[name] / 2**20:>10.1f}{peaks[name] / peaks[base]:>11.3f}"
            f"{faults[name] / a.rounds:>13.0f}"
        )


if __name__ == "__main__":
    main()
