"""Context-parallelism benchmark: CP=1 and CP=2 side by side, one training step per
sequence length, step time and peak memory per rank.

CP=1 runs in one process; CP=2 in two processes (torch.multiprocessing spawn,
gloo, one context-parallel group) that split each sequence (head + mirrored tail
chunk each) and gather K/V and the LRT buffer. Weights are replicated (no FSDP):
what is measured is the schedule's compute, its communication and its per-rank
activation memory. Every process gets --threads threads, so CP=2 uses twice the
cores of CP=1. Peak memory per rank is measured on a separate, untimed step with
tools/bench_step.py's `peak_memory` (CPU: the profiler's allocation events).

    python tools/bench_cp.py                                  # tiny model, LRT S=2, seq 2k/4k/8k
    python tools/bench_cp.py --variant baseline --seq-lens 2048 4096
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_step import VARIANTS, peak_memory

from titan_lrt.cpu_allocator import keep_freed_memory
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer
from titan_lrt.parallel.context_parallel import ContextParallel


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    layout = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        layout = ContextParallel(dist.group.WORLD)
    rows = []
    for T in a.seq_lens:
        args = ModelArgs(
            vocab_size=a.vocab,
            n_layers=a.n_layers,
            dim=a.dim,
            n_heads=a.n_heads,
            max_seq_len=T,
            lrt=LRTArgs(**VARIANTS[a.variant]),
        )
        torch.manual_seed(0)
        model = Transformer(args)
        model.init_weights()
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(1, a.vocab, (a.batch, T), generator=g)
        targets = torch.randint(1, a.vocab, (a.batch, T), generator=g)

        def step():
            model.zero_grad(set_to_none=True)
            run_schedule(model, tokens, targets, backward=lambda loss, last: loss.backward(), layout=layout)

        for _ in range(a.warmup):
            step()
        times, cpu = [], []
        for _ in range(a.steps):
            if world > 1:
                dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if world > 1:
            dist.barrier()
        rows.append(
            {
                "seq_len": T,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "cpu_s": statistics.median(cpu),
                "peak_mib": peak_memory(step, model) / 2**20,
            }
        )
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, a: argparse.Namespace) -> list[list[dict]]:
    """Per rank, per sequence length: the measurements."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _free_port(), a, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="s2", choices=sorted(VARIANTS))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    print(
        f"config: dim {a.dim}, layers {a.n_layers}, heads {a.n_heads}, vocab {a.vocab}, batch {a.batch}, "
        f"variant {a.variant}, fp32, cpu, {a.threads} thread(s) per process, median of {a.steps} steps; "
        f"torch {torch.__version__}"
    )
    t0 = time.perf_counter()
    cp1, cp2 = run(1, a), run(2, a)
    header = (
        f"{'seq':>6} | {'CP1 s':>6} {'cpu s':>6} {'MiB':>6} | {'CP2 s r0':>8} {'r1':>6} {'cpu s r0':>8} "
        f"{'r1':>6} {'MiB r0':>7} {'r1':>6} | {'CP2/CP1: time':>13} {'cpu':>6} {'mem':>6}"
    )
    print(header)
    rows = []
    for i, T in enumerate(a.seq_lens):
        one, (r0, r1) = cp1[0][i], (cp2[0][i], cp2[1][i])
        ratio = {k: max(r0[k], r1[k]) / one[k] for k in ("median_s", "cpu_s", "peak_mib")}
        print(
            f"{T:>6} | {one['median_s']:>6.3f} {one['cpu_s']:>6.3f} {one['peak_mib']:>6.1f} | "
            f"{r0['median_s']:>8.3f} {r1['median_s']:>6.3f} {r0['cpu_s']:>8.3f} {r1['cpu_s']:>6.3f} "
            f"{r0['peak_mib']:>7.1f} {r1['peak_mib']:>6.1f} | {ratio['median_s']:>13.3f} {ratio['cpu_s']:>6.3f} "
            f"{ratio['peak_mib']:>6.3f}"
        )
        rows.append({"seq_len": T, "cp1": one, "cp2": [r0, r1]})
    print(
        "(s: median wall time of a training step; cpu s: its process CPU time (robust to other load on the "
        "machine); MiB: peak memory of a step, parameters included; ratios: the slower / larger CP=2 rank "
        f"over CP=1; whole benchmark {time.perf_counter() - t0:.0f} s)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
