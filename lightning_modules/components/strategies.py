"""A ``ModelParallelStrategy`` whose sharded checkpoints appear all at once or not at all.

Lightning writes a distributed (DCP) checkpoint straight into its final folder, shard by shard;
a run killed while saving would leave a half-written ``last.ckpt`` that ``--ckpt_path last`` then
tries to load. Here every rank writes into ``<name>.partial`` and, once all ranks are done, rank
zero swaps it into place with renames. Single-file checkpoints are already written atomically by
Lightning (through an fsspec transaction), so only the sharded path needs this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from datamodules.exports import remove_path, swap_into_place

PARTIAL_SUFFIX = ".partial"


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 + optional tensor parallel) with all-or-nothing sharded saves."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.is_global_zero and partial.exists():  # left by an earlier crash
            remove_path(partial)
        self.barrier("atomic_checkpoint_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("atomic_checkpoint_written")  # every shard is on disk
        if self.is_global_zero:
            swap_into_place(partial, final)
        self.barrier("atomic_checkpoint_swapped")
