"""Stage 3: adapt the de-tokenizer to the features the stage-2 MLLM regresses; generate stories.

Training: for each story chunk, the frozen MLLM runs teacher-forced on the true previous frames
and captions (``supervise="all"`` regresses every frame after the first in one pass); the
de-tokenizer (adapter, plus UNet ``to_k``/``to_v`` or LoRA per ``train_unet``) learns to denoise the
*true* frames from those regressed features. Regressed features can be cached, since the MLLM
is frozen.

``predict_step`` generates a story per sample (start frames from the batch) with the
:class:`~lightning_modules.components.story_generator.StoryGenerator` and writes each into
``output_dir``: frames as PNG, ``story.json`` and ``storyboard.html``. With ``evaluator_dir``, every
frame is also labelled by the evaluator (in ``story.json``) and ``retention.json`` gives, per step,
how much of the start frame's cast and background the stories keep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.image import PeakSignalNoiseRatio

from datamodules.batch import batch_size
from lightning_modules.components import sharding
from lightning_modules.components.diffusion import TrainUNet, noise_keys
from lightning_modules.components.schedules import optimizer_config
from lightning_modules.components.sequence import Supervise
from lightning_modules.components.sharding import FSDPSettings
from lightning_modules.components.story_generator import GenerationSettings, Story, StoryGenerator
from lightning_modules.components.storyboard import write_story
from lightning_modules.detokenizer import DetokenizerModule, load_detokenizer
from lightning_modules.story_mllm import StoryMLLMModule, load_mllm

log = logging.getLogger(__name__)


class DetokenizerAdaptationModule(L.LightningModule):
    """Stage-1 de-tokenizer + frozen stage-2 MLLM; trains the former on the latter's features.

    Args:
        detokenizer_dir: a ``save_detokenizer`` folder (stage 1's export, or stage 3's to generate).
        mllm_dir: a ``save_mllm`` folder (stage 2's export).
        train_unet: what of the UNet trains besides the adapter (``kv`` is SEED-Story's choice).
        cond_dropout: share of samples trained on the zero-image features (keeps CFG working).
        cache_features: keep regressed features per (story, frames) chunk in memory.
        supervise: ``all`` regresses every frame after the first of a chunk; ``last`` only the last.
        val_images: validation decodes this many frames from regressed features and logs PSNR.
        generation: story generation settings for ``predict_step`` (and the callbacks).
        start_frames: how many frames of each predict sample start the story.
        output_dir: where ``predict_step`` writes the stories (and ``test`` its ``metrics.json``).
        export_dir: where the adapted de-tokenizer is saved at the end of ``fit``.
        evaluator_dir: the story evaluator (a ``save_evaluator`` folder): ``test`` scores with it, and
            ``predict`` labels every frame with it and writes ``retention.json``.
        inception_weights_path: local Inception weights for FID at real scale (else evaluator features).
        test_steps: ``test`` draws this many frames after each test story's first frame, from the
            true captions, and scores them against the true frames.
        fsdp: sharding switches under ``ModelParallelStrategy``: the de-tokenizer's UNet blocks and
            adapter are sharded; the frozen MLLM is placed on every rank (no gradients, no optimizer state).
    """

    def __init__(
        self,
        detokenizer_dir: str,
        mllm_dir: str,
        train_unet: TrainUNet = "kv",
        lora_rank: int = 8,
        cond_dropout: float = 0.1,
        cache_features: bool = False,
        supervise: Supervise = "all",
        val_images: int = 8,
        generation: GenerationSettings | None = None,
        start_frames: int = 1,
        output_dir: str = "runs/stories",
        export_dir: str | None = None,
        evaluator_dir: str | None = None,
        inception_weights_path: str | None = None,
        test_steps: int = 9,
        fsdp: FSDPSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        for name, path in (("detokenizer_dir", detokenizer_dir), ("mllm_dir", mllm_dir)):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{name}: {path} is not a folder; run the earlier stage first or fix the path")
        self.detokenizer_dir, self.mllm_dir = detokenizer_dir, mllm_dir
        self.train_unet, self.lora_rank = train_unet, lora_rank
        self.cond_dropout = cond_dropout
        self.cache_features = cache_features
        self.supervise = supervise
        self.val_images = val_images
        self.generation = generation or GenerationSettings()
        self.start_frames = start_frames
        self.output_dir = output_dir
        self.export_dir = export_dir
        self.evaluator_dir = evaluator_dir
        self.inception_weights_path = inception_weights_path
        self.test_steps = test_steps
        self.fsdp = fsdp or FSDPSettings()
        self.story_metrics = None
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.detokenizer: DetokenizerModule | None = None
        self._feature_cache: dict[tuple, torch.Tensor] = {}
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self._val_seen = 0
        self.stories_written: list[Path] = []
        self._retention = None  # StartCastRetention during predict, when evaluator_dir is given

    # The frozen MLLM is rebuilt from mllm_dir and kept out of the module tree: never in the
    # optimizer, never in checkpoints (7 B parameters at real scale), still moved by .to().
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "mllm":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn: Callable, recurse: bool = True):
        super()._apply(fn, recurse)
        if getattr(self, "mllm", None) is not None:
            self.mllm._apply(fn, recurse)
        return self

    def configure_model(self) -> None:
        if self.detokenizer is not None:
            return
        self.detokenizer = load_detokenizer(self.detokenizer_dir, train_unet=self.train_unet, lora_rank=self.lora_rank,
                                            cond_dropout=self.cond_dropout)
        mllm: StoryMLLMModule = load_mllm(self.mllm_dir)
        mllm.supervise = self.supervise
        self.mllm = mllm.to(self.device)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            detok = self.detokenizer
            sharding.shard(sharding.unet_units(detok.unet) + [detok.adapter], [detok.unet], self.device_mesh, self.fsdp)

    # -- training -------------------------------------------------------------------------

    @torch.no_grad()
    def regressed_features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features the frozen MLLM regresses for the chunk's target frames, and their (row, frame)."""
        key = (tuple(batch["story_id"]), tuple(map(tuple, batch["frame_index"].tolist())))
        if self.cache_features and key in self._feature_cache:
            return self._feature_cache[key]
        self.mllm.eval()
        out = self.mllm.forward_story(batch)
        result = (out.predicted_features.detach(), out.sequence.target_frames.to(self.device))
        if self.cache_features:
            self._feature_cache[key] = result
        return result

    def _frames(self, batch: dict[str, Any], frames: torch.Tensor, key: str) -> torch.Tensor:
        return batch[key][frames[:, 0], frames[:, 1]]

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        if batch_size(batch) == 0:
            return None
        features, frames = self.regressed_features(batch)
        keys = noise_keys(self.detokenizer.sample_seed, self.global_step if stage == "train" else None,
                          [(batch["story_id"][row], batch["frame_index"][row, col]) for row, col in frames.tolist()])
        loss = self.detokenizer.denoising_loss(
            features,
            self._frames(batch, frames, "pixels"),
            self._frames(batch, frames, "original_size"),
            self._frames(batch, frames, "crop_top_left"),
            self._frames(batch, frames, "target_size"),
            train=stage == "train",
            noise_keys=keys,
        )
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(frames), sync_dist=stage != "train")
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def on_validation_epoch_start(self) -> None:
        self._val_seen = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self._shared_step(batch, "val")
        if loss is None or self._val_seen >= self.val_images:
            return
        features, frames = self.regressed_features(batch)
        take = min(self.val_images - self._val_seen, len(frames))
        generator = torch.Generator().manual_seed(self._val_seen)
        images = self.detokenizer.decode(features[:take], generator=generator,
                                         num_inference_steps=self.generation.num_inference_steps,
                                         guidance_scale=self.generation.guidance_scale)
        self.val_psnr.update(images.float(), self._frames(batch, frames, "pixels")[:take].float())
        self._val_seen += take

    def on_validation_epoch_end(self) -> None:
        if self._val_seen:
            self.log("val/psnr_regressed", self.val_psnr.compute(), sync_dist=True)
            self.val_psnr.reset()

    def configure_optimizers(self) -> Any:
        return optimizer_config(self.detokenizer.trainable_parameters(), self.optimizer_factory, self.scheduler_factory)

    def on_fit_end(self) -> None:
        sharding.export_at_fit_end(self, self.export_dir)

    def export(self, directory: str | Path) -> Path:
        """The adapted de-tokenizer, in stage 1's format (generation loads it the same way)."""
        return self.detokenizer.save_detokenizer(directory)

    # -- generation ------------------------------------------------------------------------

    def story_generator(self, settings: GenerationSettings | None = None) -> StoryGenerator:
        self.configure_model()
        return StoryGenerator(self.mllm, self.detokenizer.eval(), settings or self.generation)

    def generate_story(self, vit_pixels: torch.Tensor, captions: list[str], images: torch.Tensor | None = None,
                       given_captions: list[str] | None = None, settings: GenerationSettings | None = None) -> Story:
        """The callbacks' and notebook's entry: continue (or visualize, with ``given_captions``) a story."""
        return self.story_generator(settings).generate(vit_pixels, captions, captions=given_captions, start_images=images)

    def on_predict_start(self) -> None:
        """With ``evaluator_dir``, label every frame of every story to measure what it keeps of its start."""
        self._retention = None
        if self.evaluator_dir and Path(self.evaluator_dir).is_dir():
            from callbacks.metrics.story_metrics import StartCastRetention
            from lightning_modules.evaluator import load_evaluator

            self._label_model = load_evaluator(self.evaluator_dir, self.device)
            self._retention = StartCastRetention(self.start_frames + self.generation.steps).to(self.device)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        results = []
        for row in range(batch_size(batch)):
            k = min(self.start_frames, int(batch["num_frames"][row]))
            story = self.generate_story(batch["vit_pixels"][row, :k], batch["captions"][row][:k], batch["pixels"][row, :k])
            folder = Path(self.output_dir) / f"story_{batch['story_id'][row]}"
            info = {"story_id": batch["story_id"][row], **story.summary(),
                    "detokenizer_dir": self.detokenizer_dir, "mllm_dir": self.mllm_dir}
            if self._retention is not None:
                info["evaluator_labels"] = self._label_story(story, batch, row)
            write_story(folder, f"story {batch['story_id'][row]}", story.captions,
                        [s.image for s in story.steps], [s.given for s in story.steps], info)
            self.stories_written.append(folder)
            results.append({"story_id": batch["story_id"][row], "folder": str(folder), "captions": story.captions})
        return results

    def _label_story(self, story: Story, batch: dict[str, Any], row: int) -> list[dict[str, Any]]:
        """The evaluator's characters and background for every frame; updates the retention metric."""
        images = [s.image for s in story.steps]
        if any(image is None for image in images):
            return []
        characters, backgrounds = self._label_model.predict_labels(torch.stack(images).to(self.device).float())
        truth = batch["characters"][row]
        if truth is not None and batch["background"][row] is not None:
            self._retention.update(characters, backgrounds, truth[0], batch["background"][row])
        return [{"characters": sorted(c), "background": b} for c, b in zip(characters, backgrounds, strict=True)]

    def on_predict_end(self) -> None:
        if self._retention is None:
            return
        from callbacks.metrics.story_metrics import retention_table

        scores = self._retention.compute()  # synced: every rank calls it, whatever it scored itself
        if len(scores["stories"]) and self.trainer.is_global_zero:
            path = Path(self.output_dir) / "retention.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({name: value.tolist() for name, value in scores.items()} | {
                "evaluator_dir": self.evaluator_dir, "detokenizer_dir": self.detokenizer_dir, "mllm_dir": self.mllm_dir}, indent=2))
            print(f"what the stories keep of their start frame ({path}):\n{retention_table(scores)}")

    # -- standalone evaluation -------------------------------------------------------------

    def on_test_start(self) -> None:
        from callbacks.metrics.story_metrics import StoryMetrics

        if not self.evaluator_dir or not Path(self.evaluator_dir).is_dir():
            raise FileNotFoundError(f"evaluator_dir: {self.evaluator_dir} is not a folder; train the evaluator "
                                    "(configs/tiny/evaluator.yaml) or point evaluator_dir at one")
        self.story_metrics = StoryMetrics.from_folder(self.evaluator_dir, self.inception_weights_path).to(self.device)
        dataset = self.trainer.datamodule.datasets["test"]
        self._test_index = {story.story_id: i for i, story in enumerate(dataset.stories)}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from callbacks.story_evaluation import score_story

        dataset = self.trainer.datamodule.datasets["test"]
        for row in range(batch_size(batch)):
            # the protocol: each test story's first frame, then its next test_steps frames
            frames = dataset.load_frames(self._test_index[batch["story_id"][row]], range(1 + self.test_steps))
            if not score_story(self, self.story_metrics, frames):
                log.warning("test: story %s has a single frame, nothing to draw; not scored", batch["story_id"][row])

    def on_test_epoch_end(self) -> None:
        from callbacks.story_evaluation import metric_table, write_metrics

        scores = self.story_metrics.compute()
        self.story_metrics.reset()
        for name, value in scores.items():
            self.log(f"test/{name}", value)
        if self.trainer.is_global_zero:
            path = write_metrics(self.output_dir, scores, {"detokenizer_dir": self.detokenizer_dir, "mllm_dir": self.mllm_dir,
                                                           "evaluator_dir": self.evaluator_dir, "test_steps": self.test_steps})
            log.info("test metrics (%s):\n%s", path, metric_table(scores))
