"""Scoring generated stories against the truth during validation (``val/<metric>``).

The protocol and the metrics live in :mod:`evaluation` (:func:`evaluation.protocol.score_story`,
:class:`evaluation.story_metrics.StoryMetrics`); this module only hooks them into training.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.images import UnreadableImage
from evaluation.protocol import metric_table, rank_share, score_story
from evaluation.story_metrics import StoryMetrics

log = logging.getLogger(__name__)


def _load(dataset, index: int, steps: int) -> dict[str, Any] | None:
    try:
        return dataset.load_frames(index, range(1 + steps))
    except UnreadableImage as err:
        log.warning("story metrics: val story %d is unreadable, not scored: %s", index, err)
        return None


class StoryMetricsCallback(L.Callback):
    """Every ``every_n_epochs`` validation runs, score ``num_stories`` val stories; log ``val/<metric>``.

    Every rank generates its share of the stories (stories are split by rank, and a sharded model
    needs all ranks anyway); metric states are synced by torchmetrics and every rank logs the
    same synced values, so any Lightning logger (or none) works.
    """

    def __init__(self, evaluator_dir: str, every_n_epochs: int = 1, num_stories: int = 4, steps: int = 5,
                 inception_weights_path: str | None = None):
        self.evaluator_dir = evaluator_dir
        self.every_n_epochs = every_n_epochs
        self.num_stories = num_stories
        self.steps = steps
        self.inception_weights_path = inception_weights_path
        self.metrics: StoryMetrics | None = None
        self._runs = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not Path(self.evaluator_dir).is_dir():
            raise FileNotFoundError(f"StoryMetricsCallback.evaluator_dir: {self.evaluator_dir} is not a folder; "
                                    "train the evaluator first (configs/tiny/evaluator.yaml)")
        self.metrics = StoryMetrics.from_folder(self.evaluator_dir, self.inception_weights_path)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "generate_story"):
            return
        self._runs += 1
        if self._runs % self.every_n_epochs:
            return
        settings = dataclasses.replace(pl_module.generation, steps=self.steps)
        dataset = trainer.datamodule.datasets["val"]
        total = min(self.num_stories, len(dataset.stories))
        self.metrics.to(pl_module.device)
        # every rank runs the same number of generations: a sharded model needs all ranks in each
        # forward pass, so a rank without a story of its own draws story 0 again and scores nothing
        for index in rank_share(total, trainer.global_rank, trainer.world_size):
            frames = _load(dataset, index, self.steps) if index >= 0 else None
            if frames is not None:
                score_story(pl_module, self.metrics, frames, settings=settings)
                continue
            filler = _load(dataset, 0, self.steps)  # padding, or an unreadable story: draw, do not score
            if filler is not None:
                pl_module.generate_story(filler["vit_pixels"][:1], filler["captions"][:1],
                                         given_captions=filler["captions"][1:], settings=settings)
        scores = self.metrics.compute()
        self.metrics.reset()
        for name, value in scores.items():
            pl_module.log(f"val/{name}", value, rank_zero_only=True)
        if trainer.is_global_zero:
            log.info("story metrics at step %d:\n%s", trainer.global_step, metric_table(scores))

