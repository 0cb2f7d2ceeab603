"""float8 training with torchao: the block linears, the feedback projection when
its shape qualifies, never the LM head (its numerics matter most and its
output feeds the loss directly)."""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_lrt.model.transformer import Transformer

RECIPES = ("tensorwise", "rowwise")
"""torchao's float8 scaling recipes (`Float8LinearConfig.from_recipe_name`) that float8.recipe_name may name."""


def float8_supported() -> bool:
    """float8 matmuls need an NVIDIA GPU of compute capability 8.9 (Ada) or newer."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _qualifies(module: nn.Module, fqn: str) -> bool:
    """float8 GEMMs need both dimensions divisible by 16; tiny gates are not worth it."""
    if not isinstance(module, nn.Linear) or "lm_head" in fqn or fqn.endswith("attention.gate"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


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
    config = _replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise")
    converted = [fqn for fqn, m in model.named_modules() if _qualifies(m, fqn)]
    convert_to_float8_training(model, config=config, module_filter_fn=_qualifies)
    return converted


def precompute_scales(model: nn.Module) -> None:
    """After each optimizer step: one all-reduce for every float8 weight's scale
    (tensorwise recipe with float8 all-gather under FSDP)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def _replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)
