"""A ``ModelParallelStrategy`` whose sharded checkpoints appear all at once or not at all.

Lightning writes a distributed (DCP) checkpoint straight into its final folder, shard by shard;
a run killed while saving would leave a half-written ``last.ckpt`` that ``--ckpt_path last`` then
tries to load. Here every rank writes into ``<name>.partial`` and, once all ranks are done, rank
zero swaps it into place with renames. Single-file checkpoints are already written atomically by
Lightning (through an fsspec transaction), so only the sharded path needs this.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

PARTIAL_SUFFIX = ".partial"


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 + optional tensor parallel) with all-or-nothing sharded saves."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.is_global_zero and partial.exists():  # left by an earlier crash
            _remove(partial)
        self.barrier("atomic_checkpoint_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("atomic_checkpoint_written")  # every shard is on disk
        if self.is_global_zero:
            swap_into_place(partial, final)
        self.barrier("atomic_checkpoint_swapped")


def swap_into_place(partial: Path, final: Path) -> None:
    """Replace ``final`` (file or folder) by ``partial`` with renames: no moment without a whole checkpoint."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        _remove(old)
    if final.exists() or final.is_symlink():
        final.rename(old)
    partial.rename(final)
    if old.exists() or old.is_symlink():
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
