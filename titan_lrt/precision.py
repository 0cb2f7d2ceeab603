"""Dtype names of the config and the compute dtype that "auto" picks (CPU bf16 detection)."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
"""The dtypes a config may name (training.mixed_precision, parallelism.mixed_precision_reduce)."""


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """training.mixed_precision as a dtype; "auto": bf16 where its matmuls are native."""
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" or cpu_has_native_bf16() else "float32"
    return DTYPES[choice]


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere they are emulated."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "AMX" in capability or "AVX512_BF16" in capability or _cpu_flag("avx512_bf16") or _cpu_flag("amx_bf16")


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False
