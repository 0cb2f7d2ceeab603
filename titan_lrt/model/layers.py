"""Parameter-free pieces of the backbone: RMSNorm, rotary embeddings, QK-norm."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor) -> Tensor:
    """RMSNorm without a learnable weight (nanochat style)."""
    return F.rms_norm(x, (x.size(-1),))


def rope_tables(max_seq_len: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim // 2), computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (first half, second half) of x (..., n, heads, head_dim).

    cos/sin are (n, head_dim // 2) or (batch, n, head_dim // 2) for per-sequence
    positions; they are broadcast over heads.
    """
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rope_then_norm(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE then QK-norm: what queries and keys go through before attention.

    Returned in x's dtype: CUDA autocast runs rms_norm in fp32, and fp32 keys
    would make the KV buffer and cache twice as large and upcast v to match.
    """
    return rms_norm(apply_rope(x, cos, sin)).to(x.dtype)


def init_uniform_(weight: Tensor, fan_in: int) -> None:
    """Uniform init with the std of N(0, 1/fan_in): same scale, no outliers."""
    bound = math.sqrt(3.0 / fan_in)
    nn.init.uniform_(weight, -bound, bound)
