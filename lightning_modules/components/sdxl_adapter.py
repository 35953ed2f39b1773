"""Image features -> SD-XL UNet conditioning, in place of SD-XL's two text encoders.

SD-XL's UNet reads ``encoder_hidden_states`` (CLIP-L 768 and OpenCLIP-G 1280 token features
concatenated to 2048), a pooled ``text_embeds`` (1280) and ``time_ids`` (size/crop conditioning).
The adapter produces all three from a resampler over frozen ViT tokens, so the pretrained UNet sees
inputs shaped like the ones it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.perceiver import PerceiverConfig, PerceiverResampler
from lightning_modules.components.seed_story_adapter import SeedStoryResampler


@dataclass
class SDXLAdapterConfig:
    """Resampler shape plus the SD-XL-like heads. Real scale: proj_dims (768, 1280), pooled 1280."""

    # "project": the project's perceiver + heads below; "seed_story": the released adapter
    # (lightning_modules.components.seed_story_adapter: token-axis normalisation, bias-free
    # feed-forward, no output projection, mean-token attention pool), which released weights need.
    # Both read the resampler's shape (its output_dim unused by "seed_story": its width is `dim`).
    layout: Literal["project", "seed_story"] = "project"
    resampler: PerceiverConfig = field(default_factory=PerceiverConfig)
    proj_dims: tuple[int, int] = (768, 1280)  # concatenated -> the UNet's cross_attention_dim
    pooled_dim: int = 1280  # text_embeds width; pooled from the second projection
    pool_heads: int = 8
    # "attention": one learned query over the tokens (like CLIP's pooled output); "flatten": a linear
    # map of all tokens in order, which keeps where each token came from (small models learn it fast)
    pool: Literal["attention", "flatten"] = "attention"
    # > 0: also a spatial map for the UNet input. Each resampler token (in grid order, so it needs
    # ``queries_from_input``) becomes ``spatial_channels x spatial_upscale^2`` values, pixel-shuffled
    # into a (spatial_channels, g * s, g * s) map that is concatenated to the latents (like SD
    # inpainting's extra input channels): where a token's content belongs is given, not learned.
    spatial_channels: int = 0
    spatial_upscale: int = 1

    @property
    def cross_attention_dim(self) -> int:
        return sum(self.proj_dims)


@dataclass
class SDXLConditioning:
    """What ``UNet2DConditionModel.forward`` takes besides the sample and the timestep."""

    encoder_hidden_states: torch.Tensor  # (B, Q, sum(proj_dims))
    text_embeds: torch.Tensor  # (B, pooled_dim)
    time_ids: torch.Tensor  # (B, 6)
    spatial: torch.Tensor | None = None  # (B, C, h, w) map for the UNet input (not a UNet kwarg)

    def unet_kwargs(self) -> dict:
        return {
            "encoder_hidden_states": self.encoder_hidden_states,
            "added_cond_kwargs": {"text_embeds": self.text_embeds, "time_ids": self.time_ids},
        }

    @staticmethod
    def cat(items: list[SDXLConditioning]) -> SDXLConditioning:
        spatial = None if items[0].spatial is None else torch.cat([c.spatial for c in items])
        return SDXLConditioning(
            torch.cat([c.encoder_hidden_states for c in items]),
            torch.cat([c.text_embeds for c in items]),
            torch.cat([c.time_ids for c in items]),
            spatial,
        )


class AttentionPool(nn.Module):
    """One learned query attends over the tokens: a pooled vector like CLIP's text ``pooler_output``."""

    def __init__(self, in_dim: int, out_dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, in_dim) * in_dim**-0.5)
        self.norm = nn.LayerNorm(in_dim)
        self.attn = nn.MultiheadAttention(in_dim, heads, batch_first=True)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return self.proj(pooled[:, 0])


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """(B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), SD-XL's micro-conditioning."""
    return torch.cat([original_size, crop_top_left, target_size], dim=-1).float()


def condition_dropout(
    features: torch.Tensor,
    null_features: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    drop: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's features by ``null_features`` with probability ``p``.

    Training on the zero-image features as the "no condition" input is what makes the same
    features usable as the unconditional branch of classifier-free guidance at sampling time.
    A precomputed ``drop`` mask (B,) replaces the draw. Returns the features and the drop mask.
    """
    if drop is None:
        drop = torch.rand(features.shape[0], generator=generator, device=features.device) < p
    drop = drop.to(features.device)
    if not drop.any():
        return features, drop
    null = null_features.to(features.dtype).expand_as(features)
    return torch.where(drop[:, None, None], null, features), drop


class SDXLAdapter(nn.Module):
    """(B, N, D) ViT tokens + size info -> :class:`SDXLConditioning` for the SD-XL UNet."""

    def __init__(self, config: SDXLAdapterConfig):
        super().__init__()
        self.config = config
        if config.layout == "seed_story":
            self._build_released(config)
            return
        out = config.resampler.output_dim
        self.resampler = PerceiverResampler(config.resampler)
        self.proj_a = nn.Linear(out, config.proj_dims[0])
        self.proj_b = nn.Linear(out, config.proj_dims[1])
        if config.pool == "flatten":
            width = config.resampler.num_queries * config.proj_dims[1]
            self.pool = nn.Sequential(nn.Flatten(1), nn.LayerNorm(width), nn.Linear(width, config.pooled_dim))
        else:
            self.pool = AttentionPool(config.proj_dims[1], config.pooled_dim, config.pool_heads)
        self.spatial = None
        if config.spatial_channels > 0:
            side = math.isqrt(config.resampler.num_queries)
            if side * side != config.resampler.num_queries or not config.resampler.queries_from_input:
                raise ValueError(
                    "adapter.spatial_channels needs the resampler to keep a square token grid: set "
                    f"resampler.queries_from_input=true and a square num_queries (got {config.resampler.num_queries})"
                )
            self.spatial = nn.Sequential(nn.LayerNorm(out), nn.Linear(out, config.spatial_channels * config.spatial_upscale**2))

    def _build_released(self, config: SDXLAdapterConfig) -> None:
        r = config.resampler
        if config.spatial_channels or r.queries_from_input or r.query_input_dim:
            raise ValueError("adapter.layout=seed_story is the released adapter: it has no spatial map, "
                             "queries_from_input or query_input_dim")
        self.resampler = SeedStoryResampler(r.input_dim, r.dim, r.depth, r.heads, r.dim_head, r.num_queries, r.ff_mult,
                                            config.proj_dims, config.pooled_dim, config.pool_heads)
        self.spatial = None

    def forward(self, features: torch.Tensor, time_ids: torch.Tensor) -> SDXLConditioning:
        if self.config.layout == "seed_story":
            hidden, pooled = self.resampler(features)
            return SDXLConditioning(hidden, pooled, time_ids.to(hidden.dtype))
        tokens = self.resampler(features)
        b = self.proj_b(tokens)
        hidden = torch.cat([self.proj_a(tokens), b], dim=-1)
        return SDXLConditioning(hidden, self.pool(b), time_ids.to(hidden.dtype), self.spatial_map(tokens))

    def spatial_map(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, g*g, D) grid-ordered tokens -> (B, C, g*s, g*s), or None without a spatial head."""
        if self.spatial is None:
            return None
        side = math.isqrt(tokens.shape[1])
        grid = self.spatial(tokens).transpose(1, 2).unflatten(-1, (side, side))  # (B, C*s*s, g, g)
        return F.pixel_shuffle(grid, self.config.spatial_upscale)


def adapter_config_from_dict(data: dict) -> SDXLAdapterConfig:
    """An :class:`SDXLAdapterConfig` from its ``dataclasses.asdict`` form (as exports store it)."""
    data = dict(data)
    data["resampler"] = PerceiverConfig(**data["resampler"])
    data["proj_dims"] = tuple(data["proj_dims"])
    return SDXLAdapterConfig(**data)
