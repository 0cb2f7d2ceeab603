"""Data parallelism with FSDP2 (`fully_shard`) and HSDP on a DeviceMesh.

Units: every block, the token embedding, the feedback projection, the LM head
(the head group: the final norm has no weights) and the root. Each pass of
every schedule calls the root and the blocks through their `__call__`, so FSDP
gathers a unit's parameters for each pass and reduces its gradients once, after
the last backward of the step.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from titan_lrt.model.transformer import Transformer

RESHARD_POLICIES = ("default", "always", "never")
"""parallelism.fsdp_reshard_after_forward: see `apply_fsdp`."""

# Blocks return views (transposed keys, unbound gates) that the schedules only read;
# FSDP2 warns about in-place ops on such views, which never happen here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")


def check_mesh_degrees(world_size: int, replicate: int, cp: int) -> None:
    """Raise ValueError, naming the key, its value and what is allowed, unless
    data_parallel_replicate_degree x context_parallel_degree divides the world size."""
    if replicate < 1 or world_size % replicate:
        allowed = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"parallelism.data_parallel_replicate_degree={replicate} must divide the number of ranks "
            f"{world_size}: allowed {allowed}"
        )
    if cp < 1 or (world_size // replicate) % cp:
        rest = world_size // replicate
        allowed = [d for d in range(1, rest + 1) if rest % d == 0]
        raise ValueError(
            f"parallelism.context_parallel_degree={cp} must divide the number of ranks / "
            f"data_parallel_replicate_degree = {world_size} / {replicate} = {rest}: allowed {allowed}"
            + (
                f" (context parallelism needs as many processes, e.g. torchrun --nproc_per_node {cp * replicate})"
                if cp > rest
                else ""
            )
        )


def build_dp_mesh(device_type: str, world_size: int, replicate: int, cp: int = 1) -> DeviceMesh:
    """A (dp_replicate, dp_shard, cp) mesh: HSDP when replicate > 1, plain FSDP otherwise.

    FSDP shards parameters over dp_shard x cp (flattened as "dp_shard_cp"): ranks of
    a context-parallel group hold different positions of the same sequences, so
    their gradients are summed like those of data-parallel ranks. The data-parallel
    ranks proper (what the data loader shards by) are "dp" = dp_replicate x dp_shard.
    """
    check_mesh_degrees(world_size, replicate, cp)
    mesh = init_device_mesh(
        device_type, (replicate, world_size // (replicate * cp), cp), mesh_dim_names=("dp_replicate", "dp_shard", "cp")
    )
    mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")
    mesh[("dp_replicate", "dp_shard")]._flatten("dp")
    return mesh


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    *,
    reshard_after_forward: str,
) -> None:
    """Shard the model in place (works on the meta device, before initialisation).

    reshard_after_forward: "default" frees every block's gathered parameters after
    each pass's forward except the last block's (used first by the backward);
    "never" keeps them gathered across all passes of a step (no re-gather for
    the S + 1 passes, the whole model's parameters resident); "always" frees
    all of them, the last block's too.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dp_mesh = mesh if mesh.mesh_dim_names is None else mesh[("dp_replicate", "dp_shard_cp")]
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        reshard = {"default": i < n - 1, "always": True, "never": False}[reshard_after_forward]
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    for unit in (model.tok_embeddings, model.feedback, model.lm_head):
        if unit is not None:
            fully_shard(unit, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward == "always")
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    # Losses are normalised by the global number of target tokens, so gradients are summed.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
