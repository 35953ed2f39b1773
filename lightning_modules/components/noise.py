"""Diffusion training noise: the DDPM schedule, per-sample keyed draws, and the regression target."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDPMScheduler


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


def keyed_uniform(keys: list[int]) -> torch.Tensor:
    """One uniform draw in [0, 1) per key, each from its own generator (the same key, the same draw)."""
    return torch.stack([torch.rand((), generator=torch.Generator().manual_seed(int(key))) for key in keys])


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
