"""The multimodal attention sink: which cached tokens a long story keeps, and evicting the rest.

SEED-Story's paper keeps the KV of (1) the first tokens of the story, (2) each image's boundary
neighbourhood (a few text tokens before ``<img>``, ``<img>`` and the first image tokens; the last
image tokens, ``</img>`` and a few tokens after) and (3) a recent window, and evicts the rest.
Boundaries are kept for the first image and the ``boundary_images`` most recent images behind
the window, so the cache is bounded however long the story grows.

Eviction really frees memory (the cache tensors are rebuilt from the kept rows) and keeps RoPE
consistent: kept keys are re-rotated to contiguous positions ``0..n-1`` (a rotation by the
position shift, since ``R(a) R(b) = R(a + b)``), so the next token, placed at position ``n``,
sees the gaps closed instead of distances the model never saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT, IMG_START, SLOT, IMG_END = 0, 1, 2, 3


@dataclass
class SinkSettings:
    """Sizes of the kept regions (in tokens, except ``boundary_images``)."""

    start_tokens: int = 4
    before_image: int = 2
    image_head: int = 4  # <img> and the first image tokens
    image_tail: int = 4  # the last image tokens and </img>
    after_image: int = 2
    recent_tokens: int = 192
    boundary_images: int = 4


@dataclass
class TokenLog:
    """What each cached token is (role and image index), in cache order."""

    roles: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # image index for <img>/slots/</img>, -1 for text

    def add(self, role: int, frame: int = -1, count: int = 1) -> None:
        self.roles += [role] * count
        self.frames += [frame] * count

    def crop(self, length: int) -> None:
        del self.roles[length:], self.frames[length:]

    def keep(self, index: list[int]) -> None:
        self.roles = [self.roles[i] for i in index]
        self.frames = [self.frames[i] for i in index]

    def __len__(self) -> int:
        return len(self.roles)


def sink_keep_indices(log: TokenLog, settings: SinkSettings) -> list[int]:
    """Indices of the cached tokens the sink keeps, in order."""
    n = len(log)
    keep = [False] * n

    def mark(start: int, stop: int) -> None:
        for i in range(max(0, start), min(n, stop)):
            keep[i] = True

    mark(0, settings.start_tokens)
    mark(n - settings.recent_tokens, n)
    starts = [i for i, r in enumerate(log.roles) if r == IMG_START]
    ends = [i for i, r in enumerate(log.roles) if r == IMG_END]
    images = list(zip(starts, ends))
    chosen = images[:1] + images[1:][-settings.boundary_images :] if settings.boundary_images > 0 else images[:1]
    for start, end in chosen:
        mark(start - settings.before_image, start + settings.image_head)
        mark(end - settings.image_tail + 1, end + 1 + settings.after_image)
    return [i for i, k in enumerate(keep) if k]


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def evict(cache, index: list[int], rotary_emb) -> None:
    """Keep only ``index`` rows of every layer, re-rotating keys to positions ``0..len(index)-1``.

    ``rotary_emb`` is the model's rotary embedding module (``model.model.rotary_emb``); the keys
    in the cache were rotated at their cache index (positions are kept contiguous, so a token's
    position equals its index).
    """
    keep = torch.tensor(index, dtype=torch.long)
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        device = keys.device
        kept = keep.to(device)
        shift = (torch.arange(len(index), device=device) - kept)[None]  # new position - old position
        cos, sin = rotary_emb(values, shift)  # (1, n, head_dim)
        k = keys.index_select(-2, kept)
        cos, sin = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)
        # index_select copies: the old, larger tensors are released when reassigned
        layer.keys = k * cos + rotate_half(k) * sin
        layer.values = values.index_select(-2, kept)
