"""The memory m_t = s_{t-1}, reset at position 0 and at document starts (DESIGN 2.2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def memory_keep_mask(tokens: Tensor, positions: Tensor, bos_token_id: int, reset_at_bos: bool) -> Tensor:
    """(B, n) bool: True where position t keeps m_t = s_{t-1}; False where m_t = 0.

    positions: (n,) or (B, n) absolute positions of the tokens.
    """
    keep = positions != 0
    if keep.dim() == 1:
        keep = keep.expand_as(tokens)
    if reset_at_bos:
        keep = keep & (tokens != bos_token_id)
    return keep


def apply_reset(memory: Tensor, keep: Tensor) -> Tensor:
    """Zero the memory where the keep mask is False."""
    return memory * keep.unsqueeze(-1).to(memory.dtype)


def shift_right(states: Tensor) -> Tensor:
    """(B, T, C) -> (B, T, C) with out[:, t] = states[:, t - 1] and out[:, 0] = 0."""
    return F.pad(states[:, :-1], (0, 0, 1, 0))
