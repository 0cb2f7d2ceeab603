"""Apply float8, activation checkpointing, torch.compile and FSDP to a model, in
that order (each wraps what the previous one produced), on the meta device."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_lrt.model.transformer import Transformer
from titan_lrt.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_lrt.parallel.compile import apply_compile
from titan_lrt.parallel.float8 import apply_float8
from titan_lrt.parallel.fsdp import apply_fsdp, build_dp_mesh, check_mesh_degrees
from titan_lrt.precision import DTYPES

logger = logging.getLogger("titan_lrt")


def parallelize(
    model: Transformer, config, device: torch.device, world_size: int, compute_dtype: torch.dtype
) -> Optional[DeviceMesh]:
    """config: the run's Config (sections float8, activation_checkpoint, compile, parallelism).

    Returns the device mesh (dims dp_replicate, dp_shard, cp; see `build_dp_mesh`), None
    for a single process."""
    fsdp = world_size > 1
    p = config.parallelism
    check_mesh_degrees(world_size, p.data_parallel_replicate_degree, p.context_parallel_degree)
    if config.float8.enable:
        converted = apply_float8(model, recipe=config.float8.recipe_name, emulate=config.float8.emulate, fsdp=fsdp)
        logger.info(
            f"float8 ({config.float8.recipe_name}{', emulated' if config.float8.emulate else ''}): "
            f"{len(converted)} linears"
        )
    ac = config.activation_checkpoint
    apply_activation_checkpointing(model, mode=ac.mode, selective_option=ac.selective_ac_option)
    if config.compile.enable:
        apply_compile(model)
    if fsdp:
        mesh = build_dp_mesh(device.type, world_size, p.data_parallel_replicate_degree, p.context_parallel_degree)
        apply_fsdp(
            model,
            mesh,
            compute_dtype,
            DTYPES[p.mixed_precision_reduce],
            reshard_after_forward=p.fsdp_reshard_after_forward,
        )
        return mesh
    return None
