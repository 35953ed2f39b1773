"""Diffusion pieces of the de-tokenizer: UNet building, latent codecs, trainable sets, EMA, sampling.

Plain functions and small modules so that stage 1 and stage 3 (which fine-tunes the same
de-tokenizer on regressed features) share them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from torch import nn

from lightning_modules.components.sdxl_adapter import SDXLConditioning

log = logging.getLogger(__name__)

TrainUNet = Literal["none", "kv", "lora", "full"]
SDXL_UNET_CONFIG = Path(__file__).with_name("sdxl_unet_config.json")
TIME_IDS = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)


# -- UNet ----------------------------------------------------------------------------------


@dataclass
class UNetSpec:
    """Where the UNet comes from.

    ``path``: a local diffusers pipeline folder (``from_pretrained(path, subfolder)``). Otherwise the
    architecture comes from ``config`` (a dict, or a JSON file path such as
    ``lightning_modules/components/sdxl_unet_config.json``) with random init. ``meta_init`` builds
    the architecture on the ``meta`` device without any weights (config checks, parameter counts).
    """

    path: str | None = None
    subfolder: str = "unet"
    config: dict[str, Any] | str | None = None
    meta_init: bool = False
    init_seed: int = 0  # random init from ``config`` under this seed: the same weights on any rank count


def load_unet_config(config: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(config, str):
        return json.loads(Path(config).read_text())
    return dict(config)


def build_unet(spec: UNetSpec, cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    """Build the UNet and check it accepts the adapter's conditioning widths."""
    if spec.path is not None and not spec.meta_init:
        unet = UNet2DConditionModel.from_pretrained(spec.path, subfolder=spec.subfolder, local_files_only=True)
    else:
        if spec.config is None:
            if spec.path is None:
                raise ValueError("unet: give `path` (local weights) or `config` (architecture)")
            config_file = Path(spec.path) / spec.subfolder / "config.json"
            config = json.loads(config_file.read_text())
        else:
            config = load_unet_config(spec.config)
        config = _fit_conditioning(config, cross_attention_dim, pooled_dim)
        with torch.device("meta") if spec.meta_init else contextlib.nullcontext(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            unet = UNet2DConditionModel.from_config(config)
    _check_conditioning(unet.config, cross_attention_dim, pooled_dim)
    return unet


def _fit_conditioning(config: dict[str, Any], cross_attention_dim: int, pooled_dim: int) -> dict[str, Any]:
    """Fill the conditioning widths from the adapter when the config leaves them out (tiny configs)."""
    config = dict(config)
    config.setdefault("addition_embed_type", "text_time")
    config.setdefault("cross_attention_dim", cross_attention_dim)
    if config.get("projection_class_embeddings_input_dim") is None:
        config["projection_class_embeddings_input_dim"] = pooled_dim + TIME_IDS * config.get("addition_time_embed_dim", 256)
    return config


def _check_conditioning(config: Any, cross_attention_dim: int, pooled_dim: int) -> None:
    expected = pooled_dim + TIME_IDS * config.addition_time_embed_dim
    if config.cross_attention_dim != cross_attention_dim or config.projection_class_embeddings_input_dim != expected:
        raise ValueError(
            f"the UNet expects cross_attention_dim={config.cross_attention_dim} and "
            f"projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}, but the adapter "
            f"gives {cross_attention_dim} and {expected} (pooled {pooled_dim} + 6 x {config.addition_time_embed_dim}): "
            f"fix adapter.proj_dims / adapter.pooled_dim"
        )


def select_trainable(unet: nn.Module, mode: TrainUNet, lora_rank: int = 8, lora_alpha: int | None = None) -> list[str]:
    """Freeze the UNet then unfreeze what ``mode`` says; returns the trainable parameter names."""
    unet.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig

        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha or lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
        unet.add_adapter(config)  # diffusers' PEFT integration; only LoRA weights require grad
    for name, param in unet.named_parameters():
        if mode == "full" or (mode == "kv" and name.endswith(("to_k.weight", "to_v.weight", "to_k.bias", "to_v.bias"))):
            param.requires_grad_(True)
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def merged_unet_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain UNet2DConditionModel (LoRA, if any, fused into its base weights) for export."""
    import copy

    unet = copy.deepcopy(unet)
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.fuse_lora()
        unet.unload_lora()
    return unet


# -- latent space --------------------------------------------------------------------------


class PixelCodec(nn.Module):
    """Fixed, lossless "autoencoder" for the tiny default: pixels folded into ``patch x patch`` channels.

    ``pixel_unshuffle`` turns (3, 64, 64) into (3 p^2, 64/p, 64/p): diffusion still happens on the
    exact pixels (the noise is i.i.d. per pixel either way) but the UNet runs at 1/p of the
    resolution, which is what makes CPU training fast. A learned VAE good enough for 64x64 frames
    would cost more CPU time than the whole de-tokenizer, and a random one loses the image; this
    codec keeps the reconstruction upper bound at exactly the input, so metrics measure the
    de-tokenizer alone.
    """

    def __init__(self, patch: int = 1):
        super().__init__()
        self.patch = patch
        self.channels = 3 * patch * patch
        self.downscale = patch

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, self.patch) if self.patch > 1 else pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.patch) if self.patch > 1 else latents


class VAECodec(nn.Module):
    """A frozen diffusers ``AutoencoderKL`` (SD-XL's VAE): latents are scaled by its ``scaling_factor``.

    Kept out of ``state_dict`` (rebuilt from its local path), like the vision encoder.
    """

    downscale = 8

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        vae.requires_grad_(False).eval()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.channels = int(vae.config.latent_channels)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return {} if destination is None else destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        pass

    def train(self, mode: bool = True) -> VAECodec:
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample


def load_codec(vae_path: str | None, subfolder: str = "vae", pixel_patch: int = 1) -> nn.Module:
    """SD-XL's VAE from a local folder, or the pixel codec when ``vae_path`` is None."""
    if vae_path is None:
        return PixelCodec(pixel_patch)
    return VAECodec(AutoencoderKL.from_pretrained(vae_path, subfolder=subfolder, local_files_only=True))


# -- noise ---------------------------------------------------------------------------------


@dataclass
class NoiseSpec:
    """DDPM training schedule (SD-XL: scaled_linear 0.00085..0.012; pixel space: linear 1e-4..0.02)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # epsilon (SD-XL), v_prediction, or sample (x0: regresses the image itself; the tiny CPU default,
    # since a briefly trained model is far better at x0 than at telling fine noise from pixels)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    timestep_spacing: str = "leading"  # used by the sampler
    steps_offset: int = 1
    # share of training samples whose timestep comes from the noisiest tenth of the schedule, where
    # only the conditioning can tell what the image is: trains the features -> image path harder
    high_noise_fraction: float = 0.0


def build_noise_scheduler(spec: NoiseSpec) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_schedule=spec.beta_schedule,
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
        prediction_type=spec.prediction_type,
        timestep_spacing=spec.timestep_spacing,
        steps_offset=spec.steps_offset,
        clip_sample=False,
    )


@dataclass
class TrainingDraw:
    """The random choices of one diffusion training step, per sample."""

    noise: torch.Tensor  # like the latents
    timesteps: torch.Tensor  # (B,) int64
    drop: torch.Tensor  # (B,) bool: conditioning replaced by the zero-image features


def sample_key(seed: int, step: int, story_id: str, frame: int) -> int:
    """A stable integer naming one sample at one step (the seed of its noise, timestep and dropout)."""
    return zlib.crc32(f"{seed}:{step}:{story_id}:{frame}".encode())


def noise_keys(seed: int, step: int | None, frames: list[tuple[str, int]]) -> list[int]:
    """:func:`sample_key` of each (story id, frame index) at a training ``step``; ``None`` (evaluation)
    uses step -1, so every validation scores the same noise and timesteps."""
    return [sample_key(seed, -1 if step is None else step, story, int(frame)) for story, frame in frames]


def draw_training_noise(
    shape: tuple[int, ...],
    num_timesteps: int,
    drop_probability: float,
    keys: list[int] | None = None,
    generator: torch.Generator | None = None,
    high_noise_fraction: float = 0.0,
) -> TrainingDraw:
    """Noise, timesteps and dropout for a batch of ``shape`` latents.

    With ``keys`` (one per sample, e.g. :func:`sample_key` of step and frame), each sample's draw
    comes from its own generator: the same sample at the same step gets the same noise whatever
    the batch it is in, so a run on 2 ranks or resumed from a checkpoint takes exactly the steps of
    a single uninterrupted run. Without keys, one ``generator`` (or the global RNG) serves all.
    A ``high_noise_fraction`` of the timesteps come from the top tenth of the schedule.
    """

    def draw(n: int, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = torch.randn((n, *shape[1:]), generator=g)
        uniform = torch.randint(0, num_timesteps, (n,), generator=g)
        high = torch.randint(num_timesteps - max(1, num_timesteps // 10), num_timesteps, (n,), generator=g)
        pick_high = torch.rand(n, generator=g) < high_noise_fraction
        drop = torch.rand(n, generator=g) < drop_probability
        return noise, torch.where(pick_high, high, uniform), drop

    if keys is None:
        return TrainingDraw(*draw(shape[0], generator))
    if len(keys) != shape[0]:
        raise ValueError(f"{len(keys)} noise keys for {shape[0]} samples")
    draws = [draw(1, torch.Generator().manual_seed(int(key))) for key in keys]
    return TrainingDraw(*(torch.cat(parts) for parts in zip(*draws)))


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if scheduler.config.prediction_type == "sample":
        return latents
    return noise


def position_grid(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, H, W) fixed 2D sin/cos maps of the pixel position (a quarter each: sin x, cos x, sin y, cos y).

    Concatenated to the UNet input (like SD inpainting's extra input channels), they tell every
    location where it is even at pure noise, which a small UNet trained briefly cannot infer
    from padding alone; cross-attention can then fetch the spatially matching feature tokens.
    """
    if channels % 4:
        raise ValueError(f"position_channels must be a multiple of 4, got {channels}")
    freqs = 2.0 ** torch.arange(channels // 4) * (torch.pi / 2)  # the lowest is monotonic over [-1, 1]: no two places alike
    ys = torch.linspace(-1, 1, height)[None, :, None] * freqs[:, None, None]
    xs = torch.linspace(-1, 1, width)[None, None, :] * freqs[:, None, None]
    shape = (channels // 4, height, width)
    return torch.cat([xs.sin().expand(shape), xs.cos().expand(shape), ys.sin().expand(shape), ys.cos().expand(shape)])


def unet_input(latents: torch.Tensor, position_channels: int, spatial: torch.Tensor | None = None) -> torch.Tensor:
    """The latents, then ``position_channels`` of :func:`position_grid`, then the adapter's spatial map.

    The spatial map (see ``SDXLAdapterConfig.spatial_channels``) is resized to the latents' size
    when the two differ. With neither extra, the latents are returned unchanged.
    """
    parts = [latents]
    if position_channels:
        grid = position_grid(position_channels, *latents.shape[-2:]).to(latents.device, latents.dtype)
        parts.append(grid.expand(latents.shape[0], -1, -1, -1))
    if spatial is not None:
        if spatial.shape[-2:] != latents.shape[-2:]:
            spatial = F.interpolate(spatial.float(), size=latents.shape[-2:], mode="bilinear", align_corners=False)
        parts.append(spatial.to(latents.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@torch.no_grad()
def sample_latents(
    unet: UNet2DConditionModel,
    cond: SDXLConditioning,
    uncond: SDXLConditioning | None,
    scheduler: EulerDiscreteScheduler,
    shape: tuple[int, ...],
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    position_channels: int = 0,
) -> torch.Tensor:
    """Euler (or any diffusers scheduler) sampling with classifier-free guidance.

    ``uncond`` is the conditioning of the zero-image features; it is skipped when
    ``guidance_scale <= 1``.
    """
    device, dtype = cond.encoder_hidden_states.device, cond.encoder_hidden_states.dtype
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device)
    latents = latents * scheduler.init_noise_sigma
    guided = uncond is not None and guidance_scale > 1.0
    both = SDXLConditioning.cat([uncond, cond]) if guided else cond
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t).to(dtype)
        out = unet(unet_input(model_in, position_channels, both.spatial), t, **both.unet_kwargs()).sample.float()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


# -- EMA -----------------------------------------------------------------------------------


class ParameterEMA:
    """Exponential moving average of a list of (trainable) parameters only.

    Not an nn.Module: averaging only what trains keeps it small when the UNet is frozen
    (``AveragedModel`` would copy the whole 2.6 B-parameter UNet).
    """

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the live parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params, strict=True)]
