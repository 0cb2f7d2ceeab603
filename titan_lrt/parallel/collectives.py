"""Differentiable collectives that work on every supported torch (2.11 and newer).

torch renamed the functional all-gather `all_gather_tensor(_autograd)` to
`all_gather_single` (whose base op carries autograd) after 2.11; 2.11 has only
the old names, and there only the `_autograd` one is differentiable. One home
for the choice, so that callers read the same on every version.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

NATIVE_ALL_GATHER = getattr(funcol, "all_gather_single", None)
"""torch's all_gather_single, or None on torch 2.11 (tests set it to None to take the fallback)."""


def all_gather_single(x: Tensor, gather_dim: int, group: dist.ProcessGroup) -> Tensor:
    """Concatenate the x of every rank of `group` along gather_dim, in rank order.
    Differentiable: the backward reduce-scatters (sums) the gradients back to their owners."""
    if NATIVE_ALL_GATHER is not None:
        return NATIVE_ALL_GATHER(x, gather_dim, group)
    # torch 2.11: the differentiable variant under its old name (plain all_gather_tensor has no backward there)
    return funcol.all_gather_tensor_autograd(x, gather_dim, group)
