"""Stage 3: adapt the de-tokenizer to the features the stage-2 MLLM regresses.

Training: for each story chunk, the frozen MLLM runs teacher-forced on the true previous frames
and captions (``supervise="all"`` regresses every frame after the first in one pass); the
de-tokenizer (adapter, plus UNet ``to_k``/``to_v`` per ``train_unet``) learns to denoise the
*true* frames from those regressed features. Stories are generated from this module during
training (``generate_story``, the callbacks' contract); ``predict`` and ``test`` belong to
:class:`~lightning_modules.story_generation.StoryGenerationModule`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.image import PeakSignalNoiseRatio

from datamodules.batch import batch_size
from datamodules.frozen import Frozen
from datamodules.sequence import Supervise
from lightning_modules.components import sharding
from lightning_modules.components.noise import noise_keys
from lightning_modules.components.schedules import optimizer_config
from lightning_modules.components.self_read import replace_with_regressions
from lightning_modules.components.sharding import FSDPSettings
from lightning_modules.components.story_generator import GenerationSettings, Story, StoryGenerator
from lightning_modules.components.unet import TrainUNet
from lightning_modules.detokenizer import DetokenizerModule, load_detokenizer
from lightning_modules.mllm_export import exported_story_format, load_mllm
from lightning_modules.story_mllm import StoryMLLMModule

log = logging.getLogger(__name__)


def check_export_dirs(**dirs: str) -> None:
    """Fail before anything is built when an earlier stage's export folder is missing."""
    for name, path in dirs.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{name}: {path} is not a folder; run the earlier stage first or fix the path")


class DetokenizerAdaptationModule(L.LightningModule):
    """Stage-1 de-tokenizer + frozen stage-2 MLLM; trains the former on the latter's features.

    Args:
        detokenizer_dir: a ``save_detokenizer`` folder (stage 1's export).
        mllm_dir: a ``save_mllm`` folder (stage 2's export).
        train_unet: what of the UNet trains besides the adapter (``kv`` is SEED-Story's choice).
        cond_dropout: share of samples trained on the zero-image features (keeps CFG working).
        supervise: ``all`` regresses every frame after the first of a chunk; ``last`` only the last.
        read_own: 0 trains on teacher-forced regressions (each from the true frames before it, the
            reference recipe). ``k`` > 0 regresses the chunk ``k`` more times, each pass reading the
            previous pass's regressions in place of the true frames after the first, so frame ``t``
            is drawn from what a generated story with the true captions would regress there (exactly
            so once ``k`` >= frames - 2): the de-tokenizer learns to draw from the features it is
            given in a story, faded ones included, not only from one-step regressions.
        val_images: validation decodes this many frames from regressed features and logs PSNR.
        generation: story generation settings for validation decoding and the callbacks' stories.
        export_dir: where the adapted de-tokenizer is saved at the end of ``fit``.
        fsdp: sharding switches under ``ModelParallelStrategy``: the de-tokenizer's UNet blocks and
            adapter are sharded, and so is the frozen MLLM (its units as stage 2 makes them; no
            gradients, so no activation checkpointing there).
    """

    def __init__(
        self,
        detokenizer_dir: str,
        mllm_dir: str,
        train_unet: TrainUNet = "kv",
        cond_dropout: float = 0.1,
        supervise: Supervise = "all",
        read_own: int = 0,
        val_images: int = 8,
        generation: GenerationSettings | None = None,
        export_dir: str | None = None,
        fsdp: FSDPSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        check_export_dirs(detokenizer_dir=detokenizer_dir, mllm_dir=mllm_dir)
        self.detokenizer_dir, self.mllm_dir = detokenizer_dir, mllm_dir
        self.train_unet = train_unet
        self.cond_dropout = cond_dropout
        if read_own < 0:
            raise ValueError(f"read_own is a number of passes, 0 or more; got {read_own}")
        self.read_own = read_own
        self.val_images = val_images
        self.generation = generation or GenerationSettings()
        if self.generation.offload:
            raise ValueError("generation.offload is for story generation alone (StoryGenerationModule); stage 3 "
                             "trains with both networks on the device: set generation.offload to false")
        self.export_dir = export_dir
        self.fsdp = fsdp or FSDPSettings()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # the stage-2 export's format with this stage's supervision: the datamodule encodes with it
        self.story_format = exported_story_format(mllm_dir).replace(supervise=supervise)
        self.detokenizer: DetokenizerModule | None = None
        self.frozen_mllm: Frozen | None = None  # rebuilt from mllm_dir, never in checkpoints or the optimizer
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self._val_seen = 0

    @property
    def mllm(self) -> StoryMLLMModule:
        return self.frozen_mllm.net

    def configure_model(self) -> None:
        if self.detokenizer is not None:
            return
        self.detokenizer = load_detokenizer(self.detokenizer_dir, train_unet=self.train_unet, cond_dropout=self.cond_dropout)
        mllm = load_mllm(self.mllm_dir)
        mllm.story_format = self.story_format
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            detok = self.detokenizer
            sharding.shard(sharding.unet_units(detok.unet) + [detok.adapter], [detok.unet], self.device_mesh, self.fsdp)
            # the frozen MLLM too, before it reaches the device: each rank only ever holds its shard
            # (no gradients or optimizer state; every rank runs the same forwards, as FSDP needs)
            mllm.shard(self.device_mesh, FSDPSettings(mixed_precision=self.fsdp.mixed_precision,
                                                      reshard_after_forward=self.fsdp.reshard_after_forward))
        self.frozen_mllm = Frozen(mllm).to(self.device)

    # -- training -------------------------------------------------------------------------

    @torch.no_grad()
    def regressed_features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features the frozen MLLM regresses for the chunk's target frames, and their (row, frame)
        (``read_own`` passes deep: see the class docs)."""
        mllm = self.mllm  # frozen, so in eval mode: no context blur or self-read of its own
        mllm.ensure_built()
        features, feature_index = mllm.story_features(batch)
        seq = mllm.sequence_of(batch)
        every = torch.ones(len(seq.target_frames), dtype=torch.bool)
        read = replace_with_regressions(mllm, seq, features, feature_index, features, every, self.read_own)
        predicted = mllm(seq, features, feature_index, read)[1]
        return predicted.detach(), seq.target_frames.to(self.device)

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
                                         guidance_scale=self.generation.guidance_scale, sampler=self.generation.sampler)
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
        return StoryGenerator(self.mllm, self.detokenizer.eval(), settings or self.generation, self.device)

    def generate_story(self, vit_pixels: torch.Tensor, captions: list[str], images: torch.Tensor | None = None,
                       given_captions: list[str] | None = None, settings: GenerationSettings | None = None) -> Story:
        """The callbacks' and notebook's entry: continue (or visualize, with ``given_captions``) a story."""
        return self.story_generator(settings).generate(vit_pixels, captions, captions=given_captions, start_images=images)
