"""Test doubles shared by several test files (never imported by the project itself)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from datamodules.batch import batch_size


class PixelMeanProbe(L.LightningModule):
    """Regresses each frame's mean colour from its ViT view, and records which stories it saw.

    Small enough to train in seconds, real enough that the loss must fall.
    """

    def __init__(self, record_dir: str | None = None, lr: float = 0.05):
        super().__init__()
        self.head = torch.nn.Linear(3, 3)
        self.record_dir = record_dir
        self.lr = lr
        self.seen: list[str] = []
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if batch_size(batch) == 0:
            return None
        vit, pixels = batch["vit_pixels"], batch["pixels"]
        if vit.dim() == 5:  # stories: use real frames only
            mask = batch["frame_mask"]
            vit, pixels = vit[mask], pixels[mask]
        loss = torch.nn.functional.mse_loss(self.head(vit.mean((-1, -2))), pixels.mean((-1, -2)))
        self.seen += batch["story_id"]
        self.losses.append(loss.item())
        self.log("train/loss", loss)
        return loss

    def on_train_epoch_end(self):
        if self.record_dir:
            path = Path(self.record_dir) / f"epoch{self.current_epoch}_rank{self.global_rank}.json"
            path.write_text(json.dumps(self.seen))
        self.seen = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)



class KillAtStep(L.Callback):
    """Kills its own process with a real signal right after optimizer step ``step`` (crash tests)."""

    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), getattr(signal, self.signal_name))


class StepLog(L.Callback):
    """Appends (global step, loss, story ids) of every training batch to a jsonl file, flushed each line.

    A ``{rank}`` in ``path`` gives each process its own file.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
        line = {"step": trainer.global_step, "loss": loss, "ids": list(batch["story_id"]),
                "frames": batch["frame_index"].tolist()}
        with open(self.path.format(rank=trainer.global_rank), "a") as handle:
            handle.write(json.dumps(line) + "\n")
