"""Training the story evaluator (:mod:`evaluation.evaluator`) as a LightningModule.

:class:`EvaluatorModule` learns the tiny CLIP towers contrastively on (frame, caption) pairs
(:func:`contrastive_loss`) and the character / background heads on the synthetic world's labels;
at the end of ``fit`` it exports the network with :func:`evaluation.evaluator.save_evaluator`,
the folder the story metrics load.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MultilabelExactMatch, MultilabelF1Score
from transformers import AutoTokenizer, CLIPModel

from datamodules.batch import batch_size
from datamodules.story_format import StoryFormat
from datamodules.synthetic_world import BACKGROUND_BY_NAME, BACKGROUND_NAMES, CHARACTER_NAMES
from evaluation.evaluator import StoryEvaluator, make_evaluator_tokenizer, save_evaluator, tiny_clip_config
from lightning_modules.components import sharding
from lightning_modules.components.schedules import optimizer_config


def contrastive_loss(
    logit_scale: torch.Tensor, image: torch.Tensor, text: torch.Tensor, captions: Sequence[str]
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with soft targets: the same caption text often occurs twice in a batch
    ("Bolt waves hello."), and hard targets would punish the model for matching it correctly."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=logits.dtype, device=logits.device)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# -- the LightningModule -------------------------------------------------------------------


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)


class EvaluatorModule(L.LightningModule):
    """Trains :class:`StoryEvaluator` on (frame, caption, characters, background) from ``mode="frames"``.

    Args:
        tokenizer_path: local tokenizer folder; ``prepare_data`` trains a word-level one there when
            it is absent, on ``tokenizer_train_file`` or, when that is unset, on the train split of
            the datamodule it is fitted with (so the corpus is written once, in the data config).
        image_size ... max_text_length: the tiny CLIPConfig (see :func:`tiny_clip_config`).
        seed: initialises the towers and heads, independent of the global seed.
        contrastive_weight / character_weight / background_weight: loss mix.
        scene_in_text: the contrastive text is the caption and the frame's place ("Pip waves
            hello. In the snow."): the world's captions name the place only when a story starts,
            so a tower learnt on them alone barely tells backgrounds apart (web captions, what
            Qwen-VL's ViT learnt from, name the scene). The world's own text, no label head.
        export_dir: written by :func:`save_evaluator` at the end of ``fit`` (rank zero).
    """

    def __init__(
        self,
        tokenizer_path: str = "data/synthetic/evaluator_tokenizer",
        tokenizer_train_file: str | None = None,
        image_size: int = 64,
        patch_size: int = 8,
        vision_width: int = 96,
        vision_layers: int = 3,
        text_width: int = 64,
        text_layers: int = 2,
        num_heads: int = 4,
        projection_dim: int = 64,
        max_text_length: int = 48,
        seed: int = 0,
        contrastive_weight: float = 1.0,
        character_weight: float = 1.0,
        background_weight: float = 1.0,
        scene_in_text: bool = False,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.tokenizer_path = tokenizer_path
        self.tokenizer_train_file = tokenizer_train_file
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.export_dir = export_dir
        self.net: StoryEvaluator | None = None
        # frames only: the datamodule's ViT view takes the evaluator's input size (linked by the CLI)
        self.story_format = StoryFormat(None, image_size)
        # a head weighted 0 never learns: its scores would only be noise in the logs
        self.scored = {"characters": character_weight > 0, "background": background_weight > 0}
        self.stage_metrics = nn.ModuleDict({stage: self._metrics(**self.scored) for stage in ("val", "test")})

    @staticmethod
    def _metrics(characters: bool, background: bool) -> MetricCollection:
        n_chars, n_bgs = len(CHARACTER_NAMES), len(BACKGROUND_NAMES)
        metrics: dict[str, Any] = {"retrieval_acc": MeanMetric()}
        if characters:
            metrics |= {"char_f1": MultilabelF1Score(n_chars, average="micro"), "frame_acc": MultilabelExactMatch(n_chars)}
        if background:
            metrics["background_acc"] = MulticlassAccuracy(n_bgs, average="micro")
        return MetricCollection(metrics, compute_groups=False)

    # -- building --------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if Path(self.tokenizer_path).exists():
            return
        corpus = [self.tokenizer_train_file] if self.tokenizer_train_file else self._datamodule_train_files()
        if corpus:
            make_evaluator_tokenizer(corpus, self.tokenizer_path, self.hparams.max_text_length)

    def _datamodule_train_files(self) -> list[str]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return list(getattr(datamodule, "files", {}).get("train", []))

    def configure_model(self) -> None:
        """Build from the tokenizer's vocabulary (late: the tokenizer is made in prepare_data)."""
        if self.net is not None:
            return
        if not Path(self.tokenizer_path).exists():
            raise FileNotFoundError(
                f"tokenizer_path {self.tokenizer_path} does not exist; fit with a datamodule that has train files "
                "(or set tokenizer_train_file) so that prepare_data trains it"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        hp = self.hparams
        config = tiny_clip_config(
            len(tokenizer), hp.image_size, hp.patch_size, hp.vision_width, hp.vision_layers,
            hp.text_width, hp.text_layers, hp.num_heads, hp.projection_dim, hp.max_text_length,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.net = StoryEvaluator(CLIPModel(config), tokenizer)

    # -- the scoring contract, delegated ---------------------------------------------------

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.image_features(images)

    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        return self.net.text_features(captions)

    def predict_characters(self, images: torch.Tensor) -> list[set[str]]:
        return self.net.predict_characters(images)

    def predict_background(self, images: torch.Tensor) -> list[str]:
        return self.net.predict_background(images)

    # -- steps -----------------------------------------------------------------------------

    def _texts(self, batch: dict[str, Any]) -> list[str]:
        if not self.hparams.scene_in_text:
            return list(batch["captions"])
        return [f"{caption} {BACKGROUND_BY_NAME[background].place.capitalize()}." for caption, background in zip(batch["captions"], batch["background"])]

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        n = batch_size(batch)
        if n == 0:
            return None
        net = self.net
        image = net.image_embeddings(batch["pixels"])
        captions = self._texts(batch)
        text = net.text_embeddings(captions)
        char_logits, bg_logits = net.heads(image)
        char_target = net.character_targets(batch["characters"])
        bg_target = net.background_targets(batch["background"])
        losses = {
            "contrastive": contrastive_loss(net.clip.logit_scale, image, text, captions),
            "characters": F.binary_cross_entropy_with_logits(char_logits, char_target.float()),
            "background": F.cross_entropy(bg_logits, bg_target),
        }
        hp = self.hparams
        weights = {"contrastive": hp.contrastive_weight, "characters": hp.character_weight, "background": hp.background_weight}
        loss = sum(weights[name] * value for name, value in losses.items())
        on_step = stage == "train"
        for name, value in losses.items():
            if weights[name] > 0:
                self.log(f"{stage}/loss_{name}", value, batch_size=n, on_step=on_step, on_epoch=not on_step)
        self.log(f"{stage}/loss", loss, batch_size=n, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        if stage in self.stage_metrics:
            self._update_metrics(stage, image, text, char_logits, bg_logits, char_target, bg_target, captions)
        return loss

    def _update_metrics(
        self, stage: str, image, text, char_logits, bg_logits, char_target, bg_target, captions
    ) -> None:
        metrics = self.stage_metrics[stage]
        if self.scored["characters"]:
            metrics["char_f1"].update(torch.sigmoid(char_logits), char_target)
            metrics["frame_acc"].update(torch.sigmoid(char_logits), char_target)
        if self.scored["background"]:
            metrics["background_acc"].update(bg_logits, bg_target)
        # image -> text retrieval in the batch; a retrieved caption with the same text counts as right
        best = (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).argmax(-1).tolist()
        hits = torch.tensor([float(captions[j] == captions[i]) for i, j in enumerate(best)], device=image.device)
        metrics["retrieval_acc"].update(hits)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, on_step=False, on_epoch=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> Any:
        return optimizer_config(self.parameters(), self.optimizer_factory, self.scheduler_factory)

    def on_fit_end(self) -> None:
        sharding.export_at_fit_end(self, self.export_dir)

    def export(self, directory: str | Path) -> Path:
        return save_evaluator(self.net, directory)
