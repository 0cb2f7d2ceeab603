"""Compare optimizer settings on a synthetic task that a small model can learn.

Each sequence is BOS, 32 tokens of a fixed sparse Markov chain (4 successors per
token), then the same 32 tokens again. A model that learned the chain and
copying reaches (ln 511 + 31 ln 4) / 64 = 0.769 nats per token; the first half
needs the embeddings and head, the copy needs attention. Fresh batches every
step (no overfitting); the score is the loss on a fixed held-out batch.

    python tools/sweep_optim.py                                  # defaults vs one shared LR
    python tools/sweep_optim.py --lrt interleaved --dim 128 --n-layers 4 \\
        --configs '[{"name": "muon", "muon_lr": 0.02}, {"lr": 0.02}]'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from titan_lrt.config import LRScheduler, Optimizer
from titan_lrt.model.args import LRTArgs, ModelArgs
from titan_lrt.model.schedule import run_schedule
from titan_lrt.model.transformer import Transformer
from titan_lrt.optim import build_lr_schedulers, build_optimizers, clip_grad_norm_

VOCAB, HALF, SUCCESSORS = 512, 32, 4


def sample(chain: torch.Tensor, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.empty(batch, HALF, dtype=torch.long)
    x[:, 0] = torch.randint(1, VOCAB, (batch,), generator=g)
    for t in range(1, HALF):
        x[:, t] = chain[x[:, t - 1], torch.randint(0, SUCCESSORS, (batch,), generator=g)]
    seq = torch.cat([torch.zeros(batch, 1, dtype=torch.long), x, x], dim=1)  # BOS (id 0), A, A
    return seq[:, :-1], seq[:, 1:]


def run(settings: dict, args: argparse.Namespace, seed: int) -> float:
    chain = torch.randint(1, VOCAB, (VOCAB, SUCCESSORS), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    model_args = ModelArgs(
        vocab_size=VOCAB,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.dim // 16,
        max_seq_len=2 * HALF + 1,
        value_embeds="all",
        lrt=LRTArgs(mode=args.lrt),
    )
    model = Transformer(model_args)
    model.init_weights()
    optimizers = build_optimizers(model, **{**vars(Optimizer()), **settings})  # the config's defaults, changed
    schedulers = build_lr_schedulers(
        optimizers, steps=args.steps, **{**vars(LRScheduler()), "warmup_steps": 10, "decay_ratio": 0.2}
    )
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(args.steps):
        tokens, targets = sample(chain, args.batch, g)
        run_schedule(model, tokens, targets).loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizers.step()
        optimizers.zero_grad()
        schedulers.step()
    tokens, targets = sample(chain, 64, torch.Generator().manual_seed(999))
    with torch.no_grad():
        return run_schedule(model, tokens, targets).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        default='[{}, {"embedding_lr_mult": 1, "head_lr_mult": 1, "scalar_lr_mult": 1}]',
        help="JSON list of build_optimizers keyword arguments ({} = the defaults)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--lrt", default="off", choices=("off", "interleaved", "jacobi"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    for settings in json.loads(args.configs):
        start = time.time()
        losses = [run(settings, args, seed) for seed in range(args.seeds)]
        print(
            f"{json.dumps(settings)}: held-out loss {statistics.mean(losses):.3f} "
            f"({' '.join(f'{x:.3f}' for x in losses)}; floor 0.769) in {time.time() - start:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
