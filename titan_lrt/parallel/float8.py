"""float8 training with torchao: the block linears, the feedback projection when
its shape qualifies, never the LM head (its numerics matter most and its
output feeds the loss directly).

`_scaled_mm` needs every GEMM dimension divisible by 16, the row count included
(it is the inner dimension of the weight gradient). A subset pass has B x T/S
rows, e.g. 5464 for S = 3 at T = 2048, so converted linears pad their rows with
zeros to the next multiple of 16: zero rows change neither the scales (amax) nor
the weight gradient, and their outputs are dropped.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from titan_lrt.model.transformer import Transformer

RECIPES = ("tensorwise", "rowwise")
"""torchao's float8 scaling recipes (`Float8LinearConfig.from_recipe_name`) that float8.recipe_name may name."""

ROW_MULTIPLE = 16
"""`_scaled_mm`'s divisibility rule for every GEMM dimension."""


def float8_supported() -> bool:
    """float8 matmuls need an NVIDIA GPU of compute capability 8.9 (Ada) or newer."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _qualifies(module: nn.Module, fqn: str) -> bool:
    """float8 GEMMs need both dimensions divisible by 16; tiny gates are not worth it."""
    if not isinstance(module, nn.Linear) or "lm_head" in fqn or fqn.endswith("attention.gate"):
        return False
    return module.in_features % ROW_MULTIPLE == 0 and module.out_features % ROW_MULTIPLE == 0


def apply_float8(model: Transformer, *, recipe: str, emulate: bool, fsdp: bool) -> list[str]:
    """Swap qualifying linears for torchao's Float8Linear; returns their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if not emulate and not float8_supported():
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(
            f"float8 training needs an NVIDIA GPU with compute capability >= 8.9 (H100, H200, B200, L40S, "
            f"RTX 4090); this machine has {device}. Use float8.emulate = true to test the numerics on CPU."
        )
    config = Float8LinearConfig.from_recipe_name(recipe)
    # all-gather weights in float8 under FSDP where the recipe allows it (tensorwise scaling)
    config = dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise")
    converted = [fqn for fqn, m in model.named_modules() if _qualifies(m, fqn)]
    convert_to_float8_training(model, config=config, module_filter_fn=_qualifies)
    for fqn in converted:
        model.get_submodule(fqn).__class__ = _row_padded_class()  # same module and names: checkpoints unchanged
    return converted


def precompute_scales(model: nn.Module) -> None:
    """After each optimizer step: one all-reduce for every float8 weight's scale
    (tensorwise recipe with float8 all-gather under FSDP)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def pad_rows(x: Tensor) -> tuple[Tensor, int]:
    """(..., K) -> (rows padded up to a multiple of ROW_MULTIPLE, K) and the real row count."""
    x2d = x.reshape(-1, x.size(-1))
    rows = x2d.size(0)
    return F.pad(x2d, (0, 0, 0, -rows % ROW_MULTIPLE)), rows


@functools.cache
def _row_padded_class() -> type:
    """Float8Linear that pads its rows (built on first use: torchao loads lazily)."""
    from torchao.float8.float8_linear import Float8Linear

    class RowPaddedFloat8Linear(Float8Linear):
        def forward(self, input: Tensor) -> Tensor:
            if (input.numel() // input.size(-1)) % ROW_MULTIPLE == 0:
                return super().forward(input)
            padded, rows = pad_rows(input)
            return super().forward(padded)[:rows].view(*input.shape[:-1], -1)

    return RowPaddedFloat8Linear
