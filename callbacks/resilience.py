"""What makes long runs survive: exact RNG resume, a guard against non-finite losses, checkpoint
folders that ``--ckpt_path last`` finds, and a damaged checkpoint named with what to do."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import random
import zipfile
from pathlib import Path, PurePath
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """Dataclasses, tuples and paths as dicts, lists and strings: what ``weights_only`` loading accepts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


class RNGStateCallback(L.Callback):
    """Saves the Python, NumPy and torch RNG states in checkpoints and restores them on resume,
    so noise, dropout and conditioning dropout continue exactly where the interrupted run was.

    It also turns the saved hyper-parameters into plain data, so that every checkpoint loads with
    ``torch.load(..., weights_only=True)`` (no pickled classes).
    """

    def state_dict(self) -> dict[str, Any]:
        version, state, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": {"version": version, "state": list(state), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
        }

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied right before the next training batch: between the restore and that batch,
        # Lightning and the DataLoader draw from the global RNG (e.g. a new iterator's seed)
        self._pending = state_dict or None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    @staticmethod
    def _restore(state_dict: dict[str, Any]) -> None:
        py = state_dict["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npy = state_dict["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
        torch.set_rng_state(state_dict["torch"])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain(dict(checkpoint[key]))


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose gradients are not finite, counts it, and stops the run with a
    clear message after ``max_in_a_row`` such steps in a row.

    Gradients are already reduced across ranks when the hook runs, so every rank decides the same.
    Skipping = dropping every gradient (AdamW leaves parameters without a gradient untouched).
    """

    def __init__(self, max_in_a_row: int = 5):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        finite = all(torch.isfinite(g.to_local() if hasattr(g, "to_local") else g).all() for g in grads)
        if finite:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        log.warning("non-finite gradients at step %d: optimizer step skipped (%d so far)", trainer.global_step, self.skipped)
        pl_module.log("train/skipped_nonfinite", float(self.skipped))
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(
                f"{self.in_a_row} optimizer steps in a row had non-finite gradients (step {trainer.global_step}): "
                "lower the learning rate, check the data, or resume from an earlier checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)


def resumable_checkpoints(trainer: L.Trainer) -> None:
    """Make ``--ckpt_path last`` find the previous run's checkpoint.

    Lightning's default folder is inside the logger's version folder, which changes every run,
    and it keeps no ``last.ckpt``. Every ``ModelCheckpoint`` without an explicit ``dirpath``
    writes to ``<default_root_dir>/checkpoints`` instead, and keeps ``last.ckpt`` unless told not to.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
            if callback.save_last is None:
                callback.save_last = True


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated by a crash or a full disk, or corrupted)."""


# what torch.load / distributed checkpoint reading raise for a truncated or corrupted checkpoint
CHECKPOINT_READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


def earlier_checkpoints(path: Path) -> list[Path]:
    """The other checkpoints beside ``path`` (files or sharded folders), newest first."""
    siblings = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve() and not p.name.endswith(".partial")]
    return sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)


def damaged_checkpoint_message(path: str | Path, err: BaseException) -> str:
    path = Path(path)
    others = earlier_checkpoints(path) if path.parent.is_dir() else []
    fix = (f"resume from an earlier one with --ckpt_path {others[0]}" + (f" (also there: {', '.join(p.name for p in others[1:4])})" if others[1:] else "")
           if others else "no other checkpoint is beside it: start the run again without --ckpt_path")
    return f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is truncated or damaged (a crash or a full disk while it was written?): {fix}"


def guard_checkpoint_loading(trainer: L.Trainer) -> None:
    """A checkpoint that cannot be read fails with a message naming it and an earlier checkpoint to
    resume from, whatever the strategy (single file or sharded folder)."""
    strategy = trainer.strategy
    load = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(checkpoint_path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except CHECKPOINT_READ_ERRORS as err:
            raise DamagedCheckpointError(damaged_checkpoint_message(checkpoint_path, err)) from err

    strategy.load_checkpoint = load_checkpoint
