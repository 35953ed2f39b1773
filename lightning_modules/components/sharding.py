"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the stage modules, under Lightning's
``ModelParallelStrategy``: each transformer layer / UNet block is its own FSDP unit, then the root.

Modules call :func:`shard` from ``configure_model`` when the strategy has given them a device
mesh (``self.device_mesh``); without one (single device, DDP) nothing changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.components.story_llm import decoder_layers

log = logging.getLogger(__name__)


@dataclass
class FSDPSettings:
    """Switches for sharded training (ignored unless the strategy provides a device mesh)."""

    mixed_precision: bool = False  # bf16 parameters in compute, fp32 gradient reduction
    activation_checkpointing: bool = False  # recompute each unit's activations in backward
    reshard_after_forward: bool = True  # ZeRO-3; False keeps gathered params until backward (ZeRO-2)


def data_parallel_mesh(mesh):
    """The data-parallel sub-mesh of Lightning's (data_parallel, tensor_parallel) mesh."""
    if mesh is None:
        return None
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def shard(units: list[nn.Module], roots: list[nn.Module], mesh, settings: FSDPSettings) -> int:
    """Make every module of ``units`` an FSDP unit, then each of ``roots``; return the unit count."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = data_parallel_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if settings.mixed_precision \
        else MixedPrecisionPolicy()
    for unit in units:
        if settings.activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(unit)
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    for root in roots:
        fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    log.info("FSDP: %d units + %d roots over %d ranks", len(units), len(roots), mesh.size())
    return len(units)


def begin(root: nn.Module) -> None:
    """Make ``root`` the FSDP root before code calls its units one by one (story generation).

    FSDP2 takes the first unit that runs forward as the root; generation never calls the root's
    own ``forward``, so without this its first unit (the embeddings) would claim the role. A no-op
    for a module that is not sharded.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(root, FSDPModule):
        fully_shard.state(root)._lazy_init()  # what the root's first forward would do; idempotent


def mllm_units(mllm: nn.Module) -> list[nn.Module]:
    """The story MLLM's FSDP units: every decoder layer, the embeddings, the head, the decoder
    stack (its final norm) and each resampler.

    ``forward()`` and story generation call these parts one by one, so each holds its own
    parameters and gathers them when called; nothing is left to the root, whose own ``forward``
    generation never calls (it names the root first with :func:`begin`).
    """
    base = mllm.base_llm
    return [*decoder_layers(mllm.llm), base.get_input_embeddings(), base.get_output_embeddings(), base.model,
            mllm.input_resampler, mllm.output_resampler]


def unet_units(unet: nn.Module) -> list[nn.Module]:
    """UNet FSDP units: every transformer block and resnet block (what holds the parameters)."""
    return [m for m in unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D")]


def export_at_fit_end(module, export_dir: str | None) -> None:
    """Write ``module.export(export_dir)`` on rank zero; a sharded run says how to consolidate instead.

    Under FSDP each rank holds only shards, so the export is made from the last (sharded)
    checkpoint by ``python -m tools.consolidate`` (which gathers it on CPU).
    """
    if not export_dir:
        return
    trainer = module.trainer
    if getattr(module, "device_mesh", None) is not None:
        if trainer.is_global_zero:
            log.warning(
                "sharded run: no export written at the end of fit. Make it from the last checkpoint with\n"
                "  python -m tools.consolidate --config <this run's config(s)> --checkpoint %s --out %s",
                getattr(trainer.checkpoint_callback, "last_model_path", None) or "<checkpoint>", export_dir,
            )
        return
    if trainer.is_global_zero:
        module.export(export_dir)
