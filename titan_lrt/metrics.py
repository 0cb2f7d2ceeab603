"""Training metrics: the console line, TensorBoard scalars, memory, throughput and MFU.

MFU is reported in two conventions side by side (`titan_lrt.model.accounting`):
ours counts the FLOPs executed (causal attention as half a square), the
published one (nanochat, torchtitan) 6N + 12 L H Q T per token, so the numbers
compare with theirs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from titan_lrt.optim import is_pathway

if TYPE_CHECKING:
    from titan_lrt.model.schedule import StepResult
    from titan_lrt.model.transformer import Transformer

logger = logging.getLogger("titan_lrt")

PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "H200 NVL": 835e12,
    "H200": 989e12,  # SXM ("NVIDIA H200"); GH200 has the same tensor cores
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,  # SXM and PCIe alike
}
"""Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; the first match
wins, so more specific names come first. Unknown hardware reports no MFU."""


def setup_logging(rank: int) -> None:
    """Console logging to stdout: INFO on rank 0, warnings only (prefixed with the rank) elsewhere."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(message)s" if rank else "%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


@dataclass
class StepStats:
    """What one optimizer step reports to the metrics."""

    results: list[StepResult]
    """The schedule's result of every micro-batch."""
    loss: torch.Tensor
    """The step's loss summed over micro-batches and ranks (the global-batch mean)."""
    grad_norm: torch.Tensor
    """Total gradient norm before clipping."""
    tokens: int
    """Tokens of the global batch."""
    flops: dict[str, float]
    """Training FLOPs of the step over all ranks, per pass name."""
    published_flops: float
    """The same in the published convention (`published_step_flops`)."""
    counts: list[float]
    """Scored targets of each pass over the global batch (the loss denominators)."""
    grad_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    """Gradient norms of parts of the model before clipping (`pathway_grad_norms`), on logged LRT steps."""


class Rates(NamedTuple):
    """Training work per second of wall time."""

    tokens: float
    flops: float
    published_flops: float
    """FLOPs in the convention nanochat and torchtitan publish (`published_step_flops`)."""


class ThroughputWindow:
    """Tokens and FLOPs per second of training since the last `rate()`; time inside `excluded()`
    (evaluation, checkpoint saves) does not count."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0
        self.work = [0.0, 0.0, 0.0]

    def add(self, tokens: int, flops: float = 0.0, published_flops: float = 0.0) -> None:
        for i, amount in enumerate((tokens, flops, published_flops)):
            self.work[i] += amount

    @contextlib.contextmanager
    def excluded(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - began

    def rate(self) -> Rates:
        """Work per second of the window, then start a new one."""
        now = time.perf_counter()
        seconds = max(now - self.start - self.paused, 1e-9)
        rates = Rates(*(amount / seconds for amount in self.work))
        self.start, self.paused, self.work = now, 0.0, [0.0, 0.0, 0.0]
        return rates


def lrt_statistics(model: Transformer, results: list[StepResult]) -> dict[str, float]:
    """Mean, min and max of the gammas over layers, and mean gate values per pass (over layers
    and micro-batches)."""
    out = {}
    gammas = [layer.gamma for layer in model.layers if layer.gamma is not None]
    if gammas:
        values = torch.cat([_local(g).detach().float().flatten() for g in gammas])
        out["lrt/gamma_mean"] = float(values.mean())
        out["lrt/gamma_min"] = float(values.min())
        out["lrt/gamma_max"] = float(values.max())
    for p in range(len(results[0].gate_means)):
        sums: dict[str, list[float]] = {}
        for r in results:
            for layer, means in zip(model.layers, r.gate_means[p]):
                if means is None:
                    continue
                for name, value in zip(layer.attention.gate_names, means.tolist()):
                    sums.setdefault(name, []).append(value)
        for name, values in sums.items():
            out[f"lrt/gate_{name}_pass{p}"] = sum(values) / len(values)
    return out


@torch.no_grad()
def pathway_grad_norms(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """L2 norms of the gradients of the LRT pathway's parameters (`titan_lrt.optim.is_pathway`) and
    of all the others, as lrt/grad_norm_pathway and lrt/grad_norm_backbone (tensors: read them when
    logging). Under FSDP every rank reduces the same parameters, so every rank must call it."""
    parts: dict[str, list[torch.Tensor]] = {"pathway": [], "backbone": []}
    for name, p in model.named_parameters():
        if p.grad is not None:
            parts["pathway" if is_pathway(name) else "backbone"].append(p.grad)
    out = {}
    for part, grads in parts.items():
        if grads:
            out[f"lrt/grad_norm_{part}"] = _local(torch.nn.utils.get_total_norm(grads, 2.0))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> Optional[float]:
    """The bf16 peak of a device by its CUDA name (None if not in the table)."""
    for fragment, peak in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return peak
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """GiB: the allocator's view on CUDA; the process's resident set on CPU."""
    gib = 2**30
    if device.type == "cuda":
        return {
            "memory/allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "memory/reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "memory/peak_gib": torch.cuda.max_memory_allocated(device) / gib,
        }
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {
        "memory/rss_gib": rss_pages * os.sysconf("SC_PAGE_SIZE") / gib,
        "memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib,
    }


class MetricsLogger:
    """Writes scalars to TensorBoard (rank 0) and one console line per log step."""

    def __init__(self, tb_folder: Optional[Path], enabled: bool):
        self.writer = None
        if enabled and tb_folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            tb_folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(tb_folder))

    def log(self, step: int, scalars: dict[str, float], line: Optional[str] = None) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if line is not None:
            logger.info(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_step_line(step: int, s: dict[str, float]) -> str:
    """One console line: the numbers a person watches while a run trains."""
    parts = [f"step {step:>6}", f"loss {s['loss/total']:.4f}"]
    passes = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in s.items() if k.startswith("loss/pass")]
    if len(passes) > 1:
        parts.append("(" + " ".join(passes) + ")")
    parts.append(f"{s['throughput/tokens_per_s']:,.0f} tok/s")
    if "flops/seen" in s:
        parts.append(f"{s['flops/seen']:.3g} FLOPs")
    if "throughput/mfu_pct" in s:
        parts.append(f"mfu {s['throughput/mfu_pct']:.1f}%")
    if "throughput/mfu_published_pct" in s:
        parts.append(f"(published convention {s['throughput/mfu_published_pct']:.1f}%)")
    parts.append(f"lr {s['optim/lr']:.2e}")
    parts.append(f"gnorm {s['optim/grad_norm']:.3f}")
    mem = s.get("memory/peak_gib", s.get("memory/rss_gib"))
    if mem is not None:
        parts.append(f"mem {mem:.2f}GiB")
    return " | ".join(parts)
