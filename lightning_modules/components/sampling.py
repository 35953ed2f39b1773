"""Sampling from the de-tokenizer: the UNet's input layout and classifier-free-guided sampling."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lightning_modules.components.sdxl_adapter import SDXLConditioning

Sampler = Literal["euler", "dpmpp"]


def build_sampler(name: Sampler, training_config) -> SchedulerMixin:
    """A fresh sampling scheduler on the training noise schedule (schedulers are stateful).

    ``euler``: the Euler discrete sampler SEED-X and SEED-Story use (50 steps in their scripts).
    ``dpmpp``: DPM-Solver++ (second-order multistep, diffusers), which needs far fewer UNet calls
    for the same ODE solution (20-25 steps; its last steps first-order, steady at low counts).
    """
    if name == "euler":
        return EulerDiscreteScheduler.from_config(training_config)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(training_config, algorithm_type="dpmsolver++", solver_order=2,
                                                       lower_order_final=True)
    raise ValueError(f"unknown sampler {name!r}: choose 'euler' or 'dpmpp'")


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
    scheduler: SchedulerMixin,
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
