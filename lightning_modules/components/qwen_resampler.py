"""Qwen-VL's single-attention resampler: ``grid²`` learned queries read a token grid in one attention.

The same architecture serves as the attention pool of the Qwen-VL ViT-G (1024 patches of width
1664 -> 256 x 4096, LayerNorm eps 1e-6) and, in SEED-Story, as the MLLM's input resampler
(256 ViT tokens -> 64 LLM slots) and output resampler (64 slot states -> 256 x 4096), both at the
LLM width with LayerNorm eps 1e-5. Its parameter names are those of the released files
(``query``, ``pos_embed``, ``kv_proj``, ``attn.in_proj_weight``, ``ln_q``, ``ln_kv``), so the
released state dicts load strictly.

Math: ``kv = ln_kv(kv_proj(x))``; ``q = ln_q(query)``; one ``nn.MultiheadAttention`` with
queries ``q + pos``, keys ``kv + pos'`` and values ``kv``, where ``pos`` is a fixed 2-D sin-cos
table of the query grid and ``pos'`` the same table resized bicubically to the input's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sines of ``dim/2`` frequencies ``10000^(-2i/dim)``, then cosines."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim) fixed positions of a square grid, row-major: as in the release, the first half
    of the channels encodes the column, the second half the row."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def resize_positions(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """A (side², C) position table resized bicubically to a (√tokens)² grid (unchanged if equal)."""
    side, target = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if side * side != table.shape[0] or target * target != tokens:
        raise ValueError(f"positions need square grids: a table of {table.shape[0]} for {tokens} tokens")
    if side == target:
        return table
    grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(tokens, -1).to(table.dtype)


@dataclass
class QwenResamplerConfig:
    """Choose a :class:`QwenResampler` where a config takes a resampler (``kind: qwen``); the
    widths and the number of queries are given by the module that builds it."""

    kind: Literal["qwen"] = "qwen"
    heads: int = 32  # SEED-Story: 32 heads at 4096
    norm_eps: float = 1e-5  # SEED-Story's MLLM resamplers: nn.LayerNorm's default


class QwenResampler(nn.Module):
    """``(B, N, kv_dim)`` tokens on a square grid -> ``(B, grid², embed_dim)``; see the module docstring.

    Args:
        grid: side of the query grid (``grid²`` queries).
        embed_dim: width of the queries and of the output.
        num_heads: attention heads.
        kv_dim: width of the input tokens; a bias-free ``kv_proj`` maps it to ``embed_dim`` when
            it differs (else there is no projection, as in the release).
        norm_eps: LayerNorm epsilon of ``ln_q`` / ``ln_kv``.
    """

    def __init__(self, grid: int, embed_dim: int, num_heads: int, kv_dim: int | None = None, norm_eps: float = 1e-5):
        super().__init__()
        self.grid, self.embed_dim = grid, embed_dim
        self.num_queries = grid * grid
        # fixed; saved (the released state dicts hold it), never trained
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid))
        self.query = nn.Parameter(torch.empty(self.num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim not in (None, embed_dim) else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.attn.in_proj_weight, std=0.02)
        nn.init.zeros_(self.attn.in_proj_bias)

    @property
    def output_dim(self) -> int:
        return self.embed_dim

    def forward(self, tokens: torch.Tensor, query_features: torch.Tensor | None = None) -> torch.Tensor:
        if query_features is not None:
            raise ValueError("the Qwen resampler has fixed learned queries: queries_from_previous needs the perceiver")
        kv = self.ln_kv(self.kv_proj(tokens))
        key_positions = resize_positions(self.pos_embed, tokens.shape[1]).to(kv.dtype)
        queries = (self.ln_q(self.query) + self.pos_embed.to(kv.dtype)).expand(tokens.shape[0], -1, -1)
        out, _ = self.attn(queries, kv + key_positions, kv, need_weights=False)
        return out
