"""Training-step benchmark: the baseline and LRT variants side by side in one process.

For each setting (eager or compiled, activation checkpointing, float8) the
variants run in alternation, one step each per round, so that the noise of a
shared machine hits them alike; the ratios to the first variant are the numbers
to read. "ratio" divides median wall times; "cpu ratio" divides median process
CPU times (all threads), which a busy machine disturbs less: where the two
disagree, the machine was not quiet. Peak memory is measured on a separate,
untimed step.

    python tools/bench_step.py                                   # reference config, eager, fp32
    python tools/bench_step.py --compile both --ac none full op  # the CPU matrix of BENCHMARKS.md
    python tools/bench_step.py --device cuda --depth 20 --seq-len 2048 --batch 4 --dtype bf16 --compile on
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from titan_lrt.cpu_allocator import keep_freed_memory
from titan_lrt.metrics import device_peak_flops
from titan_lrt.model.accounting import published_step_flops, step_flops
from titan_lrt.model.args import LRTArgs, ModelArgs, args_from_depth
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer
from titan_lrt.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_lrt.parallel.compile import apply_compile
from titan_lrt.parallel.float8 import apply_float8

VARIANTS = {
    "baseline": dict(mode="off"),
    "s2": dict(mode="interleaved", num_subsets=2),
    "s4": dict(mode="interleaved", num_subsets=4),
    "s2_refresh": dict(mode="interleaved", num_subsets=2, kv_refresh=True),
    "s2_detach": dict(mode="interleaved", num_subsets=2, detach_buffer=True),
    "s2_no_kv_feedback": dict(mode="interleaved", num_subsets=2, kv_feedback=False),  # ablation: residual path only
    "jacobi2": dict(mode="jacobi", jacobi_passes=2),
    # the cheaper schedules' steps: the LRT model running pass 0 alone (refine_fraction < 1,
    # before start_step), and a refining step whose pass 0 runs without autograd
    "s2_pass0_only": dict(mode="interleaved", num_subsets=2, refine_fraction=0.5),
    "s2_pass0_nograd": dict(mode="interleaved", num_subsets=2, pass0_backward=False),
}
PASSES = {"s2_pass0_only": 1}
"""Variants that bench one kind of step of their schedule: the number of passes it runs."""
AC = {"none": ("none", "op"), "full": ("full", "op"), "op": ("selective", "op"), "every2": ("selective", "2")}


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
    local = [t.to_local() if isinstance(t, DTensor) else t for t in [*model.parameters(), *model.buffers()]]
    resident = sum(t.numel() * t.element_size() for t in local)  # FSDP: this rank's shards
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    allocated = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return resident + max(allocated, default=0)


def build(a, variant: str, compiled: bool, ac: str, float8: bool, device) -> Transformer:
    lrt = LRTArgs(**VARIANTS[variant])
    if a.depth:
        args = args_from_depth(a.depth, vocab_size=a.vocab, max_seq_len=a.seq_len, lrt=lrt)
    else:
        args = ModelArgs(
            vocab_size=a.vocab, n_layers=a.n_layers, dim=a.dim, n_heads=a.n_heads, max_seq_len=a.seq_len, lrt=lrt
        )
    with torch.device("meta"):
        model = Transformer(args)
    if float8:
        apply_float8(model, recipe="tensorwise", emulate=device.type != "cuda", fsdp=False)
    mode, option = AC[ac]
    apply_activation_checkpointing(model, mode=mode, selective_option=option)
    if compiled:
        apply_compile(model)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights(buffer_device=device)
    return model


def run_setting(a, device, compiled: bool, ac: str, float8: bool) -> list[dict]:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    tokens = torch.randint(1, a.vocab, (a.batch, a.seq_len), device=device)
    targets = torch.randint(1, a.vocab, (a.batch, a.seq_len), device=device)
    models = {v: build(a, v, compiled, ac, float8, device) for v in a.variants}
    variant_of = {id(model): v for v, model in models.items()}

    def step(model):
        model.zero_grad(set_to_none=True)
        with autocast:
            passes = PASSES.get(variant_of[id(model)])
            run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward(), passes=passes)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for model in models.values():
        for _ in range(a.warmup):
            step(model)
    times = {v: [] for v in models}
    cpu_times = {v: [] for v in models}
    faults = {v: 0 for v in models}
    for _ in range(a.rounds):
        for v, model in models.items():
            sync()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0, c0 = time.perf_counter(), time.process_time()
            step(model)
            sync()
            times[v].append(time.perf_counter() - t0)
            cpu_times[v].append(time.process_time() - c0)
            faults[v] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    rows = []
    base = a.variants[0]
    peak_flops = device_peak_flops(device)
    for v, model in models.items():
        median = statistics.median(times[v])
        flops = step_flops(model.args, a.seq_len, PASSES.get(v))
        tokens_per_s = a.batch * a.seq_len / median
        rows.append(
            {
                "setting": f"{'compile' if compiled else 'eager'}/ac={ac}" + ("/float8" if float8 else ""),
                "variant": v,
                "median_s": median,
                "min_s": min(times[v]),
                "ratio": median / statistics.median(times[base]),
                "cpu_ratio": statistics.median(cpu_times[v]) / statistics.median(cpu_times[base]),
                "flop_ratio": flops.total / step_flops(models[base].args, a.seq_len).total,
                "tokens_per_s": tokens_per_s,
                "mfu_pct": 100 * tokens_per_s * flops.total / peak_flops if peak_flops else None,
                # nanochat's and torchtitan's convention (6N + 12 L H Q T), comparable with their numbers
                "mfu_published_pct": (
                    100 * tokens_per_s * published_step_flops(model.args, a.seq_len, PASSES.get(v)) / peak_flops
                    if peak_flops
                    else None
                ),
                "peak_mib": peak_memory(lambda m=model: step(m), model) / 2**20,
                "faults_per_step": faults[v] / a.rounds,
            }
        )
    base_peak = rows[0]["peak_mib"]
    for r in rows:
        r["mem_ratio"] = r["peak_mib"] / base_peak
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["baseline", "s2", "s4"],
        choices=sorted(VARIANTS),
        help="the first one is the reference of the ratios",
    )
    p.add_argument("--depth", type=int, default=0, help="nanochat-style flavor by depth (overrides dim/layers/heads)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="autocast dtype")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument("--ac", nargs="+", default=["none"], choices=sorted(AC))
    p.add_argument(
        "--float8",
        choices=["off", "on", "both"],
        default="off",
        help="torchao float8 (emulated on CPU: measures numerics overhead, not speed)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    # All variants' blocks share one code object, so their graphs add up against dynamo's
    # per-code recompile limit (the trainer holds one model and sets its own).
    torch._dynamo.config.recompile_limit = 64
    if device.type == "cpu":
        keep_freed_memory()
    size = f"depth {a.depth}" if a.depth else f"dim {a.dim}, layers {a.n_layers}, heads {a.n_heads}"
    print(
        f"config: {size}, seq {a.seq_len}, batch {a.batch}, vocab {a.vocab}, {a.dtype} autocast, {device.type}, "
        f"threads {torch.get_num_threads()}, {a.rounds} rounds; torch {torch.__version__}"
    )
    both = {"off": [False], "on": [True], "both": [False, True]}
    rows = []
    for compiled, ac, float8 in itertools.product(both[a.compile], a.ac, both[a.float8]):
        rows += run_setting(a, device, compiled, ac, float8)
        print_rows([r for r in rows if r["setting"] == rows[-1]["setting"]])
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def print_rows(rows: list[dict]) -> None:
    print(f"\n{rows[0]['setting']}")
    header = (
        f"{'variant':<18}{'median s':>10}{'min s':>8}{'ratio':>8}{'flops':>8}{'tok/s':>10}"
        f"{'mfu %':>7}{'pub %':>7}{'cpu ratio':>10}{'peak MiB':>10}{'mem ratio':>11}{'faults':>9}"
    )
    print(header)
    for r in rows:
        mfu, pub = (f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("mfu_pct", "mfu_published_pct"))
        print(
            f"{r['variant']:<18}{r['median_s']:>10.3f}{r['min_s']:>8.3f}{r['ratio']:>8.3f}{r['flop_ratio']:>8.3f}"
            f"{r['tokens_per_s']:>10,.0f}{mfu:>7}{pub:>7}{r['cpu_ratio']:>10.3f}{r['peak_mib']:>10.1f}"
            f"{r['mem_ratio']:>11.3f}"
            f"{r['faults_per_step']:>9.0f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
