"""Run under torchrun by tests/test_context_parallel.py: each schedule once on a single
device and once split over the context-parallel group of all ranks, same batch and
weights, in float64 (and the main cases in float32); writes the largest differences (loss, per-pass
losses, merged states and losses, gradients) to the JSON file given as argv[1]
(rank 0), as {dtype: {case: {quantity: difference}}}, and under "all_gather" the differences
of the all-gather shim's two branches (torch's all_gather_single and the torch 2.11 fallback)."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from lrt_reference import tiny_args, tiny_model

from titan_lrt.model.schedule import pass_target_counts, run_schedule
from titan_lrt.model.transformer import IGNORE_INDEX
from titan_lrt.parallel import collectives
from titan_lrt.parallel.context_parallel import ContextParallel

CASES = {
    "baseline": (64, {"lrt": {"mode": "off"}}),
    "lrt_s2": (64, {"lrt": {"num_subsets": 2}}),
    "lrt_s4": (64, {"lrt": {"num_subsets": 4}}),
    # 40 positions, chunks of 10: ranks hold unequal numbers of each subset (padded gathers)
    "lrt_s3_uneven": (40, {"lrt": {"num_subsets": 3}}),
    "lrt_s2_refresh_layerwise_mid_source": (
        32,
        {"lrt": {"num_subsets": 2, "kv_refresh": True, "projection": "layerwise", "source_layer": 1}},
    ),
    "lrt_s4_detached_refresh": (32, {"lrt": {"num_subsets": 4, "detach_buffer": True, "kv_refresh": True}}),
    "lrt_s2_windows": (32, {"window_pattern": "SL", "short_window": 5, "lrt": {"num_subsets": 2}}),
    "jacobi": (32, {"lrt": {"mode": "jacobi", "jacobi_passes": 3}}),
    "lrt_s2_pass0_without_backward": (32, {"lrt": {"num_subsets": 2, "pass0_backward": False}}),
    # the FlexAttention path (what "auto" takes on CUDA): block masks from the query runs;
    # forward only (FlexAttention has no backward on CPU)
    "lrt_s2_flex": (32, {"attention_backend": "flex", "lrt": {"num_subsets": 2}}),
    "lrt_s2_windows_flex": (
        32,
        {"attention_backend": "flex", "window_pattern": "SL", "short_window": 5, "lrt": {"num_subsets": 2}},
    ),
}

FP32_CASES = ("baseline", "lrt_s2", "lrt_s4")
"""Also run in float32 (to 1e-5); every case runs in float64 (to 1e-10)."""


def batch(args, T: int, C: int):
    """Two rows, 7 documents: row 0 holds 3, two of them starting exactly at a chunk border
    whose previous position belongs to another rank (c and 3c); row 1 starts inside a
    document, has no BOS at those borders (memory crosses ranks there), a BOS at the
    border 2c, one inside a chunk and one at the last position."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(2, args.vocab_size, (2, T), generator=g)
    c = T // (2 * C)
    tokens[0, [0, c, 3 * c]] = args.bos_token_id  # 3 documents, starts on two chunk borders
    tokens[1, [2 * c, 2 * c + 3, T - 1]] = args.bos_token_id  # no BOS at 0; 3 starts, one on a border
    targets = torch.randint(2, args.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))
    targets[0, c - 1] = IGNORE_INDEX
    targets[1, 2] = IGNORE_INDEX
    return tokens, targets


def counts(model, targets):
    return pass_target_counts(model.args.lrt, targets).tolist()


def run(model, tokens, targets, layout=None):
    model.zero_grad(set_to_none=True)
    if model.args.attention_backend == "flex":
        with torch.no_grad():
            return run_schedule(model, tokens, targets, loss_denominators=counts(model, targets), layout=layout), {}
    result = run_schedule(
        model,
        tokens,
        targets,
        backward=lambda loss, last: loss.backward(),
        loss_denominators=counts(model, targets),
        layout=layout,
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return result, grads


def compare(name: str, T: int, overrides: dict, cp: ContextParallel, dtype: torch.dtype) -> dict[str, float]:
    args = tiny_args(**{**overrides, "lrt": {"mode": "interleaved", **overrides.get("lrt", {})}})
    torch.manual_seed(0)
    model = tiny_model(args).to(dtype)
    tokens, targets = batch(args, T, cp.degree)
    single, single_grads = run(model, tokens, targets)
    split, split_grads = run(model, tokens, targets, layout=cp)

    def total(t):
        t = t.clone()
        dist.all_reduce(t, group=cp.group)
        return t

    diffs = {"loss": float((total(split.loss.detach()) - single.loss.detach()).abs())}
    local = split.pass_positions[0]
    diffs["states"] = float((split.states - single.states[:, local]).abs().max())
    diffs["merged_token_loss"] = float((split.token_loss - single.token_loss[:, local]).abs().max())
    for i, (positions, token_loss) in enumerate(zip(split.pass_positions, split.pass_token_losses)):
        reference = single.pass_token_losses[i]
        reference_positions = single.pass_positions[i]
        at = torch.searchsorted(reference_positions, positions)
        diffs[f"pass{i}_token_loss"] = float((token_loss - reference[:, at]).abs().max())
    # over the group, the full pass and (interleaved) the subset passes together compute every position once
    sets = [local] + ([torch.cat(split.pass_positions[1:])] if args.lrt.mode == "interleaved" else [])
    for k, mine in enumerate(sets):
        gathered = [torch.zeros_like(mine) for _ in range(cp.degree)]
        dist.all_gather(gathered, mine, group=cp.group)
        diffs[f"positions_not_covered_once_{k}"] = float(
            not torch.equal(torch.cat(gathered).sort().values, torch.arange(T))
        )
    if not single_grads:
        return diffs
    grad = grad_rel = 0.0
    for n, g in split_grads.items():
        diff = (total(g) - single_grads[n]).abs().max()
        grad = max(grad, float(diff))
        grad_rel = max(grad_rel, float(diff / single_grads[n].abs().max().clamp(min=1e-6)))
    diffs["grad"] = grad
    diffs["grad_rel"] = grad_rel
    diffs["grad_norm"] = float(torch.stack([g.norm() for g in single_grads.values()]).norm())
    return diffs


GATHER_COUNTS = (3, 2)
"""Entries per rank in the all-gather check: unequal, so ContextParallel.gather pads and trims."""


def gather_piece(rank: int) -> torch.Tensor:
    """Rank r's (2, counts[r], 3) piece: a literal function of (rank, row, entry, channel)."""
    r, n, c = torch.meshgrid(torch.arange(2), torch.arange(GATHER_COUNTS[rank]), torch.arange(3), indexing="ij")
    return (100.0 * rank + 10 * r + n + 0.1 * c).double()


def gather_weight(rank: int) -> torch.Tensor:
    """What rank q multiplies the gathered (2, sum(counts), 3) tensor by before summing it."""
    return torch.arange(2 * sum(GATHER_COUNTS) * 3, dtype=torch.float64).reshape(2, -1, 3) * (rank + 1) / 7


def gather_branches(cp: ContextParallel) -> dict[str, float]:
    """ContextParallel.gather through each branch of the shim, forward and backward, against the
    literal concatenation and the literal gradient (summed over every rank that used a piece)."""
    rank, world = cp.rank, cp.degree
    expected = torch.cat([gather_piece(q) for q in range(world)], dim=1)
    start = sum(GATHER_COUNTS[:rank])
    expected_grad = sum(gather_weight(q) for q in range(world))[:, start : start + GATHER_COUNTS[rank]]
    diffs, results = {}, {}
    for branch in ("native", "fallback"):
        calls = []

        def counted(*args, calls=calls, old=funcol.all_gather_tensor_autograd):
            calls.append(1)
            return old(*args)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(funcol, "all_gather_tensor_autograd", counted)
            if branch == "fallback":  # as on torch 2.11, which has no all_gather_single
                mp.setattr(collectives, "NATIVE_ALL_GATHER", None)
            x = gather_piece(rank).requires_grad_()
            gathered = cp.gather(x, 1, GATHER_COUNTS)
            (gathered * gather_weight(rank)).sum().backward()
        took_fallback = bool(calls)
        diffs[f"{branch}_took_fallback"] = float(took_fallback)
        diffs[f"{branch}_values"] = float((gathered.detach() - expected).abs().max())
        diffs[f"{branch}_grad"] = float((x.grad - expected_grad).abs().max())
        results[branch] = (gathered.detach(), x.grad)
    diffs["fallback_vs_native"] = max(float((a - b).abs().max()) for a, b in zip(*results.values()))
    diffs["torch_has_native"] = float(collectives.NATIVE_ALL_GATHER is not None)
    return diffs


def main(out: str) -> None:
    dist.init_process_group("gloo")
    cp = ContextParallel(dist.group.WORLD)
    results = {
        str(dtype): {
            name: compare(name, T, overrides, cp, dtype)
            for name, (T, overrides) in CASES.items()
            if dtype == torch.float64 or name in FP32_CASES
        }
        for dtype in (torch.float32, torch.float64)
    }
    mine = gather_branches(cp)
    everyone = [None] * cp.degree
    dist.all_gather_object(everyone, mine)
    results["all_gather"] = {k: max(d[k] for d in everyone) for k in mine}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
