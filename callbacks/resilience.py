"""Callbacks that make long runs survive: exact RNG resume and a guard against non-finite losses."""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


class RNGStateCallback(L.Callback):
    """Saves the Python, NumPy and torch RNG states in checkpoints and restores them on resume,
    so noise, dropout and conditioning dropout continue exactly where the interrupted run was."""

    def state_dict(self) -> dict[str, Any]:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        random.setstate(state_dict["python"])
        np.random.set_state(state_dict["numpy"])
        torch.set_rng_state(state_dict["torch"])


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
