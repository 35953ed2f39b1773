"""Learning-rate schedules used by the published recipes (as LR scheduler classes for configs)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` x lr at ``total_steps``.

    SEED-Story's stage-2 recipe: 100 warm-up steps, 6000 steps, down to 5% of the peak lr. In a
    config ``total_steps`` is left unset: the CLI gives it ``trainer.max_steps``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int | None = None, min_ratio: float = 0.0,
                 last_epoch: int = -1):
        if total_steps is None:
            raise ValueError("WarmupCosineLR needs total_steps (through train.py it is trainer.max_steps)")
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_config(params, optimizer_factory, scheduler_factory=None):
    """What ``configure_optimizers`` returns: the optimizer over ``params``, and a per-step scheduler."""
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}
