"""Training metrics: the console line, TensorBoard scalars, memory, throughput and MFU.

MFU is reported in two conventions side by side (`titan_lrt.model.accounting`):
ours counts the FLOPs executed (causal attention as half a square), the
published one (nanochat, torchtitan) 6N + 12 L H Q T per token, so the numbers
compare with theirs.
"""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path
from typing import Optional

import torch

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
