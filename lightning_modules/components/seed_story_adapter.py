"""SEED-Story's de-tokenizer adapter, as released: ViT tokens -> SD-XL conditioning.

The released de-tokenizers (pretrained and George-adapted) hold this module under ``resampler.*``
(SEED-X's ``ResamplerXLV2``), so its parameter names are the release's and a released state dict
loads strictly. It differs from the project's :class:`~lightning_modules.components.sdxl_adapter.SDXLAdapter`
in five ways, each kept here because the released weights expect it:

- the input tokens are L2-normalised over the **token** axis (``F.normalize`` on dim 1 of
  (B, N, D)), then projected by ``proj_in``;
- each block is a perceiver attention (``norm1`` on the features, ``norm2`` on the latents,
  bias-free ``to_q`` / ``to_kv`` / ``to_out``, keys and values from features and latents
  together) and a feed-forward whose two linears have **no bias**;
- ``norm_out`` and **no output projection**: ``unet_proj_1`` (768) and ``unet_proj_2`` (1280)
  read the normed latents directly and are concatenated to the UNet's 2048;
- the pooled 1280-d ``text_embeds`` come from ``unet_attnpool``: a mean token is prepended to
  the latents, learned positions are added, every token attends (separate q / k / v projections
  with bias) and the mean token's output, through ``c_proj``, is the pooled vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReleasedPerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # the features
        self.norm2 = nn.LayerNorm(dim)  # the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # the release scales q and k by d^-1/4 each: the same product
        return self.to_out(out.transpose(1, 2).flatten(2))


def released_feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, bias-free Linear, GELU, bias-free Linear (keys ``0``, ``1``, ``3`` as released)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False))


class MeanTokenAttentionPool(nn.Module):
    """A mean token prepended to ``seq_len`` tokens, learned positions, one multi-head attention in
    which every token is a query; the mean token's output (through ``c_proj``) is the pooled vector."""

    def __init__(self, seq_len: int, dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, dim) / dim**0.5)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.positional_embedding.to(tokens.dtype)
        # only the mean token's output is used, and each query attends independently: compute that one
        q = self.q_proj(x[:, :1])
        k, v = self.k_proj(x), self.v_proj(x)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.c_proj(out[:, 0])


class SeedStoryResampler(nn.Module):
    """(B, N, input_dim) ViT tokens -> (B, Q, sum(proj_dims)) UNet tokens and (B, pooled_dim) pooled."""

    def __init__(self, input_dim: int, dim: int, depth: int, heads: int, dim_head: int, num_queries: int, ff_mult: int,
                 proj_dims: tuple[int, int], pooled_dim: int, pool_heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(input_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([ReleasedPerceiverAttention(dim, heads, dim_head), released_feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.unet_proj_1 = nn.Linear(dim, proj_dims[0])
        self.unet_proj_2 = nn.Linear(dim, proj_dims[1])
        self.unet_attnpool = MeanTokenAttentionPool(num_queries, dim, pool_heads, pooled_dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.proj_in(F.normalize(tokens, dim=1))  # over the token axis, as released
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(features, latents)
            latents = latents + ff(latents)
        hidden = self.norm_out(latents)
        return torch.cat([self.unet_proj_1(hidden), self.unet_proj_2(hidden)], dim=-1), self.unet_attnpool(hidden)
