"""Stage 1: the de-tokenizer. Frozen ViT features of a frame -> SD-XL-style UNet that redraws it.

Orchestration only: the vision encoder, adapter, UNet, codecs, noise, sampler and EMA live in
:mod:`lightning_modules.components`; metrics in :mod:`evaluation.reconstruction`. Real scale:
SD-XL base UNet + VAE from a local folder, the published adapter, resampler + ``to_k``/``to_v``
trained. The tiny default (a random CLIP tower, a small UNet diffusing 64 px pixels folded 4x4)
and why each of its options is there: ``configs/tiny/stage1_detokenizer.yaml`` and the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from datamodules.batch import batch_size
from datamodules.exports import load_tensors, read_export, save_tensors, writing_export
from datamodules.story_format import StoryFormat
from evaluation.reconstruction import reconstruction_metrics
from lightning_modules.components import sharding
from lightning_modules.components.codecs import load_codec
from lightning_modules.components.ema import ParameterEMA
from lightning_modules.components.noise import (
    NoiseSpec,
    build_noise_scheduler,
    diffusion_target,
    draw_training_noise,
    noise_keys,
)
from lightning_modules.components.sampling import Sampler, build_sampler, sample_latents, unet_input
from lightning_modules.components.schedules import optimizer_config
from lightning_modules.components.sdxl_adapter import (
    SDXLAdapter,
    SDXLAdapterConfig,
    SDXLConditioning,
    adapter_config_from_dict,
    condition_dropout,
    sdxl_time_ids,
)
from lightning_modules.components.sharding import FSDPSettings
from lightning_modules.components.storyboard import comparison_grid
from lightning_modules.components.strict_load import load_strictly
from lightning_modules.components.unet import TrainUNet, UNetSpec, build_unet, merged_unet_copy, select_trainable
from lightning_modules.components.vision_encoder import FrozenVisionEncoder, VisionEncoderConfig

log = logging.getLogger(__name__)

EXPORT_KIND = "detokenizer"
ADAPTER_FILE = "adapter.safetensors"
NULL_FEATURES_FILE = "null_features.safetensors"  # the zero image's ViT features: generation never builds the ViT

class DetokenizerModule(L.LightningModule):
    """ViT features -> image, trained with the ε- (or v-) prediction MSE of a DDPM schedule.

    Args:
        vision_encoder: the frozen tower (kept out of checkpoints and optimizers).
        adapter: perceiver resampler + SD-XL heads (always trained); its input width is the encoder's.
        unet: where the UNet comes from (local weights, architecture config, or ``meta_init``).
        vae_path: local diffusers folder with a ``vae`` subfolder; ``None`` diffuses pixels.
        pixel_patch: without a VAE, pixels are folded ``p x p`` into channels (lossless) so the
            UNet runs at 1/p resolution; the UNet's in/out channels must be ``3 p^2``.
        position_channels: fixed sin/cos position maps appended to the UNet input (its
            ``in_channels`` = latent channels + this; 0 at real scale, where SD-XL's UNet is as released).
        noise: the DDPM training schedule and prediction type.
        train_unet: what of the UNet trains: ``none`` (adapter only), ``kv`` (+ every attention's
            ``to_k``/``to_v``, SEED-Story's default), ``lora`` (+ PEFT LoRA) or ``full``.
        cond_dropout: probability of replacing a sample's features by the zero-image features.
        ema_decay: keep an EMA of the trainable weights (used for validation and export).
        num_inference_steps / guidance_scale: sampling defaults (Euler, CFG).
        val_images: how many validation frames (the first ones) are reconstructed and scored.
        val_inference_steps: cheaper sampling during validation (None: ``num_inference_steps``).
        lpips_backbone: local torchvision AlexNet weights for LPIPS (else the labelled random-net fallback).
        fsdp: sharding switches used under ``ModelParallelStrategy`` (mixed precision, checkpointing).
        init_from: a stage-1 export to start from (e.g. the released pretrained de-tokenizer, converted
            by ``python -m tools.convert detokenizer``): its ``unet/`` replaces ``unet``'s source, its adapter loads strictly.
        export_dir: where :meth:`save_detokenizer` writes at the end of ``fit`` (stage 3 starts from it).
        sample_seed: seed of the validation sampling noise (same frames, same noise, every epoch).
    """

    def __init__(
        self,
        adapter: SDXLAdapterConfig,
        unet: UNetSpec,
        vision_encoder: VisionEncoderConfig | None = None,
        vae_path: str | None = None,
        pixel_patch: int = 4,
        position_channels: int = 0,
        noise: NoiseSpec | None = None,
        train_unet: TrainUNet = "kv",
        lora_rank: int = 8,
        cond_dropout: float = 0.1,
        ema_decay: float | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        val_images: int = 8,
        val_inference_steps: int | None = None,
        lpips_backbone: str | None = None,
        sample_seed: int = 0,
        init_from: str | None = None,
        export_dir: str | None = None,
        fsdp: FSDPSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.vision_config = vision_encoder or VisionEncoderConfig()
        self.vision_encoder = FrozenVisionEncoder(self.vision_config)
        # the resampler reads the encoder's tokens: its input width is the encoder's, never written twice
        self.adapter_config = dataclasses.replace(adapter, resampler=dataclasses.replace(adapter.resampler, input_dim=self.vision_encoder.dim))
        self.init_from = init_from
        if init_from is not None:  # a wrong folder fails here, before anything is built
            read_export(init_from, EXPORT_KIND)
            unet = UNetSpec(path=str(init_from), subfolder="unet")
        self.unet_spec = unet
        self.noise_spec = noise or NoiseSpec()
        self.vae_path = vae_path
        self.pixel_patch = pixel_patch
        self.position_channels = position_channels
        self.train_unet = train_unet
        self.lora_rank = lora_rank
        self.cond_dropout = cond_dropout
        self.ema_decay = ema_decay
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.val_images = val_images
        self.val_inference_steps = val_inference_steps or num_inference_steps
        self.sample_seed = sample_seed
        self.export_dir = export_dir
        self.fsdp = fsdp or FSDPSettings()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

        self.story_format = StoryFormat(None, self.vision_encoder.image_size)  # frames only: the ViT view's size
        self.adapter = SDXLAdapter(self.adapter_config)
        self.noise_scheduler = build_noise_scheduler(self.noise_spec)
        self.unet: torch.nn.Module | None = None  # built in configure_model (large at real scale)
        self.codec: torch.nn.Module | None = None
        self.ema: ParameterEMA | None = None
        self.val_metrics = reconstruction_metrics(lpips_backbone)
        self.last_reconstructions: torch.Tensor | None = None  # (3, H, W) grid in [0, 1]: originals over reconstructions
        self._val_seen = 0
        self._ema_ctx = contextlib.ExitStack()

    # -- building ------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the UNet (and codec) once; choose what trains."""
        if self.unet is not None:
            return
        if not self.unet_spec.meta_init:
            self.codec = load_codec(self.vae_path, pixel_patch=self.pixel_patch)
        # a UNet built from a config that leaves its channels out gets them from what feeds it:
        # the codec's latents + position maps + the adapter's spatial map in, the latents out
        latent = self.codec.channels if self.codec is not None else None
        spatial = self.adapter_config.spatial_channels
        io = (latent + self.position_channels + spatial, latent) if latent is not None else None
        self.unet = build_unet(self.unet_spec, self.adapter_config.cross_attention_dim, self.adapter_config.pooled_dim, io)
        if self.init_from is not None:
            load_strictly(self.adapter, load_tensors(self.init_from, ADAPTER_FILE), f"{self.init_from}/{ADAPTER_FILE}")
        trainable = select_trainable(self.unet, self.train_unet, lora_rank=self.lora_rank)
        log.info("UNet: %d trainable tensors (train_unet=%s)", len(trainable), self.train_unet)
        if not self.unet_spec.meta_init:
            want_in, want_out = self.codec.channels + self.position_channels + spatial, self.codec.channels
            if (self.unet.config.in_channels, self.unet.config.out_channels) != (want_in, want_out):
                raise ValueError(f"the UNet takes {self.unet.config.in_channels} and gives {self.unet.config.out_channels} "
                                 f"channels, but the codec has {self.codec.channels} latent channels, position_channels="
                                 f"{self.position_channels} and adapter.spatial_channels={spatial}: set unet in_channels="
                                 f"{want_in} and out_channels={want_out}")
            if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
                sharding.shard(sharding.unet_units(self.unet) + [self.adapter], [self.unet], self.device_mesh, self.fsdp)
            if self.ema_decay is not None:
                self.ema = ParameterEMA(self.trainable_parameters(), self.ema_decay)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        return optimizer_config(self.trainable_parameters(), self.optimizer_factory, self.scheduler_factory)

    # -- training ------------------------------------------------------------------------

    def conditioning(self, features: torch.Tensor, time_ids: torch.Tensor) -> SDXLConditioning:
        return self.adapter(features.to(self.dtype), time_ids)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        n = batch_size(batch)
        if n == 0:
            return None
        # noise keyed by (step, frame): any world size or a resumed run draws the same
        keys = noise_keys(self.sample_seed, self.global_step if stage == "train" else None,
                          list(zip(batch["story_id"], batch["frame_index"].tolist())))
        loss = self.denoising_loss(
            self.vision_encoder(batch["vit_pixels"]),
            batch["pixels"],
            batch["original_size"],
            batch["crop_top_left"],
            batch["target_size"],
            train=stage == "train",
            noise_keys=keys,
        )
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=stage != "train")
        return loss

    def denoising_loss(
        self,
        features: torch.Tensor,
        pixels: torch.Tensor,
        original_size: torch.Tensor,
        crop_top_left: torch.Tensor,
        target_size: torch.Tensor,
        train: bool = True,
        generator: torch.Generator | None = None,
        noise_keys: list[int] | None = None,
    ) -> torch.Tensor:
        """The diffusion loss of drawing ``pixels`` from ``features`` (real ViT or MLLM-regressed).

        In training, a ``cond_dropout`` share of the samples get the zero-image features instead.
        Noise, timesteps and dropout come from ``noise_keys`` (one per sample, see
        :func:`~lightning_modules.components.noise.draw_training_noise`) or from ``generator``.
        """
        n = features.shape[0]
        latents = self.codec.encode(pixels.to(self.dtype)).float()
        p_drop = self.cond_dropout if train else 0.0
        draw = draw_training_noise(tuple(latents.shape), self.noise_scheduler.config.num_train_timesteps, p_drop,
                                   keys=noise_keys, generator=generator,
                                   high_noise_fraction=self.noise_spec.high_noise_fraction if train else 0.0)
        if p_drop > 0:
            features, dropped = condition_dropout(features, self.vision_encoder.null_features(), p_drop, drop=draw.drop)
            if self._trainer is not None:  # not when stage 3 drives this module
                self.log("train/cond_dropped", dropped.float().mean(), batch_size=n)
        time_ids = sdxl_time_ids(original_size, crop_top_left, target_size)
        cond = self.conditioning(features, time_ids)
        noise, t = draw.noise.to(latents.device), draw.timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(unet_input(noisy.to(self.dtype), self.position_channels, cond.spatial), t, **cond.unet_kwargs()).sample
        return F.mse_loss(pred.float(), diffusion_target(self.noise_scheduler, latents, noise, t))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update()

    # -- validation ----------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_seen = 0
        self._val_grid: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.ema is not None:
            self._ema_ctx.enter_context(self.ema.swapped())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss = self._shared_step(batch, "val")
        if loss is None or self._val_seen >= self.val_images or self.trainer.sanity_checking:
            return loss
        take = min(self.val_images - self._val_seen, batch_size(batch))
        generator = torch.Generator().manual_seed(self.sample_seed + self._val_seen)
        images = self.reconstruct(
            batch["vit_pixels"][:take],
            batch["original_size"][:take],
            batch["crop_top_left"][:take],
            batch["target_size"][:take],
            num_inference_steps=self.val_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generator,
        )
        target = batch["pixels"][:take]
        self.val_metrics.update(images.float(), target.float())
        self._val_grid.append((target.detach().cpu(), images.detach().float().cpu()))
        self._val_seen += take
        return loss

    def on_validation_epoch_end(self) -> None:
        self._ema_ctx.close()
        if self._val_seen == 0:
            return
        scores = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, sync_dist=True)
        self.last_reconstructions = comparison_grid(self._val_grid)

    # -- sampling ------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        features: torch.Tensor,
        original_size: torch.Tensor | None = None,
        crop_top_left: torch.Tensor | None = None,
        target_size: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
    ) -> torch.Tensor:
        """(B, N, D) ViT-space features (real or regressed) -> images (B, 3, H, W) in [-1, 1].

        Sizes default to the UNet's native resolution, uncropped. The unconditional CFG branch is
        the zero-image features, as in training's conditioning dropout.
        """
        n = features.shape[0]
        native = self.unet.config.sample_size * self.codec.downscale
        default = torch.tensor([[native, native]], device=features.device).expand(n, 2)
        target_size = default if target_size is None else target_size
        original_size = target_size if original_size is None else original_size
        crop_top_left = torch.zeros_like(target_size) if crop_top_left is None else crop_top_left
        time_ids = sdxl_time_ids(original_size, crop_top_left, target_size).to(features.device)
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.conditioning(features, time_ids)
        uncond = self.conditioning(self.vision_encoder.null_features(n), time_ids) if guidance > 1.0 else None
        h, w = (int(s) // self.codec.downscale for s in target_size[0])
        latents = sample_latents(self.unet, cond, uncond, build_sampler(sampler or "euler", self.noise_scheduler.config), (n, self.codec.channels, h, w),
                                 num_inference_steps or self.num_inference_steps, guidance, generator, self.position_channels)
        return self.codec.decode(latents.to(self.dtype)).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(
        self,
        vit_pixels: torch.Tensor,
        original_size: torch.Tensor | None = None,
        crop_top_left: torch.Tensor | None = None,
        target_size: torch.Tensor | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Encode frames with the frozen ViT and decode them again (the stage-1 task)."""
        return self.decode(self.vision_encoder(vit_pixels), original_size, crop_top_left, target_size, **sampling)

    # -- checkpoints and export ----------------------------------------------------------

    def on_fit_end(self) -> None:
        sharding.export_at_fit_end(self, self.export_dir)

    def export(self, directory: str | Path) -> Path:
        """This stage's release format (what ``tools.consolidate`` writes too)."""
        return self.save_detokenizer(directory)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["detokenizer_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "detokenizer_ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["detokenizer_ema"])

    def export_config(self) -> dict[str, Any]:
        """Everything except weights needed to rebuild this de-tokenizer."""
        return {
            "vision_encoder": dataclasses.asdict(self.vision_config),
            "adapter": dataclasses.asdict(self.adapter_config),
            "noise": dataclasses.asdict(self.noise_spec),
            "vae_path": self.vae_path,
            "pixel_patch": self.pixel_patch,
            "position_channels": self.position_channels,
            "sampling": {"scheduler": "EulerDiscreteScheduler", "num_inference_steps": self.num_inference_steps,
                         "guidance_scale": self.guidance_scale},
        }

    def save_detokenizer(self, directory: str | Path) -> Path:
        """The export: ``unet/`` (diffusers format, LoRA fused) and ``adapter.safetensors``; with EMA, the averaged weights."""
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext(), \
                writing_export(directory, EXPORT_KIND, self.export_config()) as tmp:
            merged_unet_copy(self.unet).save_pretrained(tmp / "unet")
            save_tensors(tmp, ADAPTER_FILE, self.adapter.state_dict())
            save_tensors(tmp, NULL_FEATURES_FILE, {"null_features": self.vision_encoder.null_features(1)[0].float().contiguous()})
        log.info("exported the de-tokenizer to %s", directory)
        return Path(directory)


def load_detokenizer(directory: str | Path, **overrides: Any) -> DetokenizerModule:
    """Rebuild a de-tokenizer from its export (frozen UNet; override e.g. ``train_unet``): stage 3 and generation start here."""
    spec = read_export(directory, EXPORT_KIND)
    kwargs: dict[str, Any] = dict(
        vision_encoder=VisionEncoderConfig(**spec["vision_encoder"]),
        adapter=adapter_config_from_dict(spec["adapter"]),
        unet=UNetSpec(),  # init_from: the export's own unet/
        init_from=str(directory),
        vae_path=spec["vae_path"],
        pixel_patch=spec["pixel_patch"],
        position_channels=spec["position_channels"],
        noise=NoiseSpec(**spec["noise"]),
        train_unet="none",
        num_inference_steps=spec["sampling"]["num_inference_steps"],
        guidance_scale=spec["sampling"]["guidance_scale"],
    )
    module = DetokenizerModule(**(kwargs | overrides))
    module.configure_model()
    if (Path(directory) / NULL_FEATURES_FILE).is_file():  # exports before this file build the ViT when first asked
        module.vision_encoder.null_cache = load_tensors(directory, NULL_FEATURES_FILE)["null_features"]
    return module
