"""FSDP benchmark: reshard-after-forward policies and gradient-sync modes, side by side in one run.

    torchrun --nproc_per_node 2 tools/bench_fsdp.py                 # CPU (gloo), 2 ranks
    torchrun --nproc_per_node 8 tools/bench_fsdp.py --dim 1024 --n-layers 12 --seq-len 2048

Every setting is a separately sharded copy of the same model; the settings run
in alternation, one step each per round, so that the noise of a shared machine
hits them alike. A step is --micro-batches micro-batches, each through the
schedule of its variant with its backward (as the trainer runs them), without
the optimizer. Settings:

- reshard policy (LRT S=2 and the baseline, gradient sync on the last micro-batch):
  "default" frees a block's gathered parameters after each pass's forward
  (all blocks but the last), "always" frees all, "never" keeps every block
  gathered across the S + 1 passes of the step;
- gradient sync (LRT S=2, reshard "default"): reduce-scatter once, after the
  last micro-batch, or after every micro-batch.

Printed per setting: median step time and its ratio to the first setting, and
rank 0's peak memory (parameter shards included; CPU: from the profiler's
allocation events, as tools/bench_step.py measures it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_step import peak_memory

from titan_lrt.config import Parallelism
from titan_lrt.cpu_allocator import keep_freed_memory
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer
from titan_lrt.parallel.distributed import init_distributed, shutdown
from titan_lrt.parallel.fsdp import apply_fsdp, build_dp_mesh

SETTINGS = [  # (name, variant, reshard policy, gradient sync)
    ("s2 reshard=default sync=last", "s2", "default", "last"),
    ("s2 reshard=always  sync=last", "s2", "always", "last"),
    ("s2 reshard=never   sync=last", "s2", "never", "last"),
    ("s2 reshard=default sync=every", "s2", "default", "every"),
    ("baseline reshard=default sync=last", "baseline", "default", "last"),
    ("baseline reshard=never   sync=last", "baseline", "never", "last"),
]
LRT = {"s2": LRTArgs(mode="interleaved", num_subsets=2), "baseline": LRTArgs(mode="off")}


def build(a, variant: str, reshard: str, mesh) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(
        vocab_size=a.vocab, n_layers=a.n_layers, dim=a.dim, n_heads=a.n_heads, max_seq_len=a.seq_len, lrt=LRT[variant]
    )
    model = Transformer(args)
    model.init_weights()
    model.init_buffers(torch.device("cpu"))
    apply_fsdp(model, mesh, torch.float32, torch.float32, reshard_after_forward=reshard)
    return model


def step(model, batches, sync: str) -> None:
    model.zero_grad(set_to_none=True)
    for i, (tokens, targets) in enumerate(batches):
        last_micro_batch = i == len(batches) - 1

        def backward(loss, last, last_micro_batch=last_micro_batch):
            model.set_requires_gradient_sync(sync == "every" or (last_micro_batch and last))
            loss.backward()

        run_schedule(model, tokens, targets, backward=backward)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per rank")
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    keep_freed_memory()
    info = init_distributed(device="cpu", timeout_s=Parallelism().process_group_timeout_seconds)
    mesh = build_dp_mesh("cpu", info.world_size, 1)
    g = torch.Generator().manual_seed(info.rank)
    batches = [
        (
            torch.randint(1, a.vocab, (a.batch, a.seq_len), generator=g),
            torch.randint(1, a.vocab, (a.batch, a.seq_len), generator=g),
        )
        for _ in range(a.micro_batches)
    ]
    models = {name: build(a, variant, reshard, mesh) for name, variant, reshard, _ in SETTINGS}
    sync_of = {name: sync for name, _, _, sync in SETTINGS}
    for _ in range(a.warmup):
        for name, model in models.items():
            step(model, batches, sync_of[name])
    times = {name: [] for name in models}
    for _ in range(a.rounds):
        for name, model in models.items():
            dist.barrier()
            t0 = time.perf_counter()
            step(model, batches, sync_of[name])
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, model in models.items():
        peaks[name] = peak_memory(lambda m=model, n=name: step(m, batches, sync_of[n]), model)
    if info.is_main:
        first = next(iter(models))
        print(
            f"FSDP benchmark: {info.world_size} ranks (gloo, CPU), dim {a.dim}, {a.n_layers} layers, seq {a.seq_len}, "
            f"{a.micro_batches} micro-batches of {a.batch} per rank, vocab {a.vocab}, fp32, median of {a.rounds} rounds"
        )
        print(f"{'setting':38s}{'median s':>10s}{'ratio':>8s}{'peak MiB (rank 0)':>19s}{'mem ratio':>11s}")
        for name in models:
            median = statistics.median(times[name])
            print(
                f"{name:38s}{median:10.3f}{median / statistics.median(times[first]):8.3f}"
                f"{peaks[name] / 2**20:19.1f}{peaks[name] / peaks[first]:11.3f}"
            )
    shutdown(0)


if __name__ == "__main__":
    main()
