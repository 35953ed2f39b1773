"""Sample stories during training: logged to W&B as a table and a storyboard, saved as files."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L

from lightning_modules.components.story_generator import GenerationSettings, Story
from lightning_modules.components.storyboard import storyboard_html, to_pil, write_story

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """Where a run's files go: the logger's directory when there is one, else the root dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def val_starts(trainer: L.Trainer, count: int, frames: int) -> list[dict[str, Any]]:
    """The first ``frames`` frames of the first ``count`` val stories (the same every time)."""
    datamodule = trainer.datamodule
    if "val" not in datamodule.datasets:
        datamodule.setup("validate")
    dataset = datamodule.datasets["val"]
    return [dataset.load_frames(i, range(frames)) for i in range(min(count, len(dataset.stories)))]


class SampleStoryCallback(L.Callback):
    """Every ``every_n_epochs`` validation epochs, generate stories from fixed val starts.

    Modes: ``continuation`` (the model writes the captions) and ``visualization`` (the true
    captions are given, the model draws). Every rank generates (a sharded model needs all ranks
    in each forward pass); rank zero logs a ``wandb.Table`` (story, step, caption, image) and the
    storyboard HTML to a W&B logger if there is one, and writes the story folders under
    ``<run dir>/samples/epoch_XXX/``. The module must provide ``generate_story(...)``.
    """

    def __init__(self, every_n_epochs: int = 1, num_stories: int = 2, steps: int = 6, start_frames: int = 1,
                 modes: tuple[str, ...] = ("continuation", "visualization"), settings: GenerationSettings | None = None):
        self.every_n_epochs = every_n_epochs
        self.num_stories = num_stories
        self.steps = steps
        self.start_frames = start_frames
        self.modes = modes
        self.settings = settings
        self._runs = 0

    def _due(self, trainer: L.Trainer) -> bool:
        """Counts validation runs (step-based training validates several times per epoch)."""
        if trainer.sanity_checking:
            return False
        self._runs += 1
        return self._runs % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "generate_story") or not self._due(trainer):
            return
        settings = self.settings or dataclasses.replace(pl_module.generation, steps=self.steps)
        stories: list[tuple[str, str, Story]] = []
        for start in val_starts(trainer, self.num_stories, self.start_frames + self.steps):
            k = self.start_frames
            for mode in self.modes:
                given = start["captions"][k:] if mode == "visualization" else None
                story = pl_module.generate_story(start["vit_pixels"][:k], start["captions"][:k], start["pixels"][:k],
                                                 given_captions=given, settings=settings)
                stories.append((str(start["story_id"]), mode, story))
        # every rank asks: under a distributed strategy, trainer.log_dir is a broadcast (a collective)
        folder = run_dir(trainer) / "samples" / f"epoch_{trainer.current_epoch:03d}_step_{trainer.global_step:06d}"
        if trainer.is_global_zero:
            self._write(trainer, stories, folder)

    def _write(self, trainer: L.Trainer, stories: list[tuple[str, str, Story]], folder: Path) -> None:
        for story_id, mode, story in stories:
            write_story(folder / f"story_{story_id}_{mode}", f"story {story_id} ({mode}, step {trainer.global_step})",
                        story.captions, [s.image for s in story.steps], [s.given for s in story.steps], story.summary())
        log.info("sample stories written to %s", folder)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, trainer, stories)

    @staticmethod
    def _log_wandb(logger, trainer: L.Trainer, stories: list[tuple[str, str, Story]]) -> None:
        import wandb

        table = wandb.Table(columns=["story", "mode", "step", "given", "caption", "image"])
        boards = {}
        for story_id, mode, story in stories:
            for i, step in enumerate(story.steps):
                image = wandb.Image(to_pil(step.image)) if step.image is not None else None
                table.add_data(story_id, mode, i, step.given, step.caption, image)
            pictures = [to_pil(s.image) if s.image is not None else None for s in story.steps]
            boards[f"samples/storyboard_{story_id}_{mode}"] = wandb.Html(
                storyboard_html(f"story {story_id} ({mode})", story.captions, pictures, [s.given for s in story.steps]))
        logger.experiment.log({"samples/stories": table, **boards, "trainer/global_step": trainer.global_step})

