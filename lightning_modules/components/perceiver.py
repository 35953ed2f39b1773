"""The one Perceiver resampler of the project: a fixed number of learned queries read a token set.

Stage 1 uses it to turn ViT tokens into SD-XL conditioning; stage 2 reuses the same class for its
input resampler (ViT tokens -> LLM width) and output resampler (LLM hidden states -> ViT tokens),
so every resampler shares one implementation and one config shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerceiverConfig:
    """Shape of a :class:`PerceiverResampler` (serialisable, so exports can rebuild it)."""

    kind: Literal["perceiver"] = "perceiver"  # see lightning_modules.components.resamplers
    input_dim: int = 128
    dim: int = 128
    depth: int = 2
    heads: int = 4
    dim_head: int = 32
    num_queries: int = 16
    output_dim: int = 128
    ff_mult: int = 4
    # start each query from its input token (plus the learned query): the output keeps the input's
    # token order, e.g. a ViT's patch grid; needs num_queries == the number of input tokens
    queries_from_input: bool = False
    # > 0: ``forward(..., query_features=...)`` adds a projection of these (B, num_queries, this)
    # features to the learned queries, e.g. stage 2's output resampler starting each output token
    # from the previous frame's token at the same place, so it edits that frame instead of
    # drawing from nothing
    query_input_dim: int = 0


class CrossAttention(nn.Module):
    """Queries attend to ``context``; pre-normed on both sides (Flamingo-style)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``context_mask`` (B, M) bool: False hides that context token (padding)."""
        q = self.to_q(self.norm_q(queries))
        # queries also see themselves, so a query can keep information it already gathered
        kv_in = torch.cat([self.norm_kv(context), self.norm_q(queries)], dim=1)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        mask = None
        if context_mask is not None:
            visible = torch.cat([context_mask, context_mask.new_ones(queries.shape[:2])], dim=1)
            mask = visible[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class PerceiverResampler(nn.Module):
    """(B, M, input_dim) tokens -> (B, num_queries, output_dim) tokens.

    ``depth`` residual blocks of cross-attention (learned queries over the inputs) and a
    feed-forward, between an input projection and a normed output projection.
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.config = config
        self.proj_in = nn.Linear(config.input_dim, config.dim)
        self.queries = nn.Parameter(torch.randn(config.num_queries, config.dim) * config.dim**-0.5)
        self.proj_query = nn.Linear(config.query_input_dim, config.dim) if config.query_input_dim else None
        self.blocks = nn.ModuleList(
            nn.ModuleList([CrossAttention(config.dim, config.heads, config.dim_head), FeedForward(config.dim, config.ff_mult)])
            for _ in range(config.depth)
        )
        self.norm_out = nn.LayerNorm(config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None,
                query_features: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``queries`` (B, Q, dim) replaces the learned ones; ``query_features`` (see
        ``query_input_dim``) are projected and added to them; ``mask`` (B, M) bool hides the
        inputs where it is False (padding)."""
        context = self.proj_in(x)
        latents = self.queries.expand(x.shape[0], -1, -1) if queries is None else queries
        if (self.proj_query is None) != (query_features is None):
            raise ValueError("query_features are given exactly when the config has query_input_dim > 0")
        if query_features is not None:
            latents = latents + self.proj_query(query_features.to(latents.dtype))
        if self.config.queries_from_input:
            if context.shape[1] != latents.shape[1]:
                raise ValueError(f"queries_from_input needs num_queries == input tokens, got {latents.shape[1]} and {context.shape[1]}")
            latents = latents + context
        for attn, ff in self.blocks:
            latents = latents + attn(latents, context, mask)
            latents = latents + ff(latents)
        return self.proj_out(self.norm_out(latents))
