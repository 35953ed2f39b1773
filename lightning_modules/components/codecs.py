"""Latent spaces of the de-tokenizer: SD-XL's VAE, or the lossless pixel codec of the tiny default."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from datamodules.frozen import Frozen

SDXL_VAE_CONFIG = Path(__file__).with_name("sdxl_vae_config.json")  # SD-XL base 1.0's vae/config.json


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

    Held by :class:`~datamodules.frozen.Frozen` (rebuilt from its local path, never
    in checkpoints), like the vision encoder.
    """

    downscale = 8

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.frozen_vae = Frozen(vae)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.channels = int(vae.config.latent_channels)

    @property
    def vae(self) -> AutoencoderKL:
        return self.frozen_vae.net

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


def sdxl_vae_architecture() -> AutoencoderKL:
    """SD-XL's VAE from its published config with random weights (no files but the config): for the
    memory planner (under ``torch.device("meta")``), the benchmark and the GPU tests."""
    return AutoencoderKL.from_config(AutoencoderKL.load_config(str(SDXL_VAE_CONFIG)))
