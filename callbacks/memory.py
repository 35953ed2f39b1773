"""Per-rank memory and speed of training: local parameter / optimizer bytes and step time.

Under FSDP a parameter is a DTensor and only its local shard counts, so the numbers show what
sharding saves. Written to ``<out_dir>/memory_rank{r}_of{w}.json`` at the end of training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class MemoryReportCallback(L.Callback):
    """Measures after the first optimizer step (when optimizer state exists) and times steps after it."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.report: dict[str, float] = {}
        self._times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._times.append(time.perf_counter() - self._start)
        if "param_bytes" not in self.report:
            self.report["param_bytes"] = sum(local_bytes(p) for p in pl_module.parameters())
            self.report["optimizer_bytes"] = sum(
                local_bytes(v) for opt in trainer.optimizers for state in opt.state.values()
                for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)

    def on_train_end(self, trainer, pl_module) -> None:
        steady = self._times[1:] or self._times
        self.report["step_seconds"] = sum(steady) / max(1, len(steady))
        self.report.update(rank=trainer.global_rank, world_size=trainer.world_size)
        if self.out_dir:
            path = Path(self.out_dir) / f"memory_rank{trainer.global_rank}_of{trainer.world_size}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.report))
