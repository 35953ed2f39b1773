"""The frozen visual tokenizer: ``vit_pixels`` (B, 3, S, S) -> (B, N, D) feature tokens.

The tower is never trained and its weights are either a local pretrained folder or rebuilt
deterministically from a config, so it is held by :class:`~datamodules.frozen.Frozen`:
not in ``parameters()`` (never reaches an optimizer), not in ``state_dict()`` (checkpoints stay
small), still moved by ``.to()``. It is built lazily on first use (instantiating a real-scale
config costs nothing and never touches weights).

Backends:

- ``"tiny_clip"``: a small transformers ``CLIPVisionModel`` from a ``CLIPVisionConfig``, random
  init under a fixed seed (the embedded CPU default; same seed -> same weights).
- ``"hf"``: any local Hugging Face vision tower (``CLIPVisionModel``, ``SiglipVisionModel`` or an
  ``AutoModel`` with ``last_hidden_state``) loaded from ``path``.
- ``"qwen_vl"``: the real Qwen-VL-Chat ViT-G + attention-pool resampler (256 x 4096). Its loader
  is later work; building it raises ``NotImplementedError`` but its shape is known, so real-scale
  configs can be instantiated (e.g. on the ``meta`` device) without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.frozen import Frozen

log = logging.getLogger(__name__)


Backend = Literal["tiny_clip", "hf", "qwen_vl"]

# Known output shape of the real Qwen-VL visual tokenizer (448 px, patch 14, 1024 patches,
# width 1664, 48 layers, then an attention-pool resampler to 256 queries of 4096).
QWEN_VL_TOKENS, QWEN_VL_DIM, QWEN_VL_IMAGE_SIZE = 256, 4096, 448


@dataclass
class VisionEncoderConfig:
    """How to (re)build the frozen tower; stored in exports instead of its weights."""

    backend: Backend = "tiny_clip"
    path: str | None = None  # local folder for "hf" / "qwen_vl"
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    seed: int = 0  # tiny_clip init seed
    drop_cls: bool = True  # keep only patch tokens (N = (S/P)^2)
    num_tokens: int | None = None  # adaptive-avg-pool the tokens to this many (None: keep all)
    output_dim: int | None = None  # "hf": the tower's hidden size, when known without loading


def _build_tiny_clip(cfg: VisionEncoderConfig) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return CLIPVisionModel(config)


def _build_hf(cfg: VisionEncoderConfig) -> nn.Module:
    if not cfg.path:
        raise ValueError("vision encoder backend 'hf' needs `path`: a local Hugging Face model folder")
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    model_type = getattr(config, "model_type", "")
    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True)
    if model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel.from_pretrained(cfg.path, local_files_only=True)
    return AutoModel.from_pretrained(cfg.path, local_files_only=True)


def _build_qwen_vl(cfg: VisionEncoderConfig) -> nn.Module:
    raise NotImplementedError(
        "The Qwen-VL-Chat ViT-G visual tokenizer (448 px, patch 14, width 1664, 48 layers, attention-pool "
        "resampler to 256x4096) is not implemented yet: loading it from a local Qwen-VL-Chat checkpoint is "
        "planned together with stage 2. Use backend 'hf' with a local CLIP/SigLIP tower, or 'tiny_clip'."
    )


BUILDERS: dict[str, Callable[[VisionEncoderConfig], nn.Module]] = {
    "tiny_clip": _build_tiny_clip,
    "hf": _build_hf,
    "qwen_vl": _build_qwen_vl,
}


class FrozenVisionEncoder(nn.Module):
    """Frozen ViT features, always computed in eval mode without gradients (see module doc)."""

    def __init__(self, config: VisionEncoderConfig | None = None):
        super().__init__()
        self.config = config or VisionEncoderConfig()
        if self.config.backend not in BUILDERS:
            raise ValueError(f"unknown vision encoder backend {self.config.backend!r}; choose one of {sorted(BUILDERS)}")
        # an empty buffer that follows .to(): the device/dtype the tower is built on
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self.frozen_tower: Frozen | None = None  # built on first use

    # -- shape -----------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return QWEN_VL_IMAGE_SIZE if self.config.backend == "qwen_vl" else self.config.image_size

    @property
    def num_tokens(self) -> int:
        cfg = self.config
        if cfg.num_tokens is not None:
            return cfg.num_tokens
        if cfg.backend == "qwen_vl":
            return QWEN_VL_TOKENS
        patches = (cfg.image_size // cfg.patch_size) ** 2
        return patches if cfg.drop_cls else patches + 1

    @property
    def dim(self) -> int:
        cfg = self.config
        if cfg.backend == "qwen_vl":
            return QWEN_VL_DIM
        if cfg.backend == "hf":
            if cfg.output_dim is not None:
                return cfg.output_dim
            return int(self.tower.config.hidden_size)
        return cfg.hidden_size

    # -- the tower -------------------------------------------------------------------------

    @property
    def tower(self) -> nn.Module:
        if self.frozen_tower is None:
            tower = BUILDERS[self.config.backend](self.config)
            self.frozen_tower = Frozen(tower.to(device=self._anchor.device, dtype=self._anchor.dtype))
            log.info("built frozen vision tower %s (%d parameters)", self.config.backend, sum(p.numel() for p in tower.parameters()))
        return self.frozen_tower.net

    # -- features --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, vit_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP-normalised pixels -> (B, num_tokens, dim) features."""
        if vit_pixels.shape[-1] != self.image_size or vit_pixels.shape[-2] != self.image_size:
            raise ValueError(
                f"vit_pixels are {tuple(vit_pixels.shape[-2:])} but the vision encoder expects {self.image_size}px: "
                f"set the datamodule's vit_image_size to {self.image_size}"
            )
        tower = self.tower
        pixels = vit_pixels.to(self._anchor.dtype)
        tokens = tower(pixel_values=pixels).last_hidden_state
        if self.config.drop_cls and self.config.backend != "qwen_vl":
            tokens = tokens[:, 1:]
        if self.config.num_tokens is not None and tokens.shape[1] != self.config.num_tokens:
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.config.num_tokens).transpose(1, 2)
        return tokens

    @torch.no_grad()
    def null_features(self, batch: int = 1) -> torch.Tensor:
        """Features of an all-zero ``vit_pixels`` input (as SEED-X feeds for the unconditional branch)."""
        zeros = self._anchor.new_zeros((1, 3, self.image_size, self.image_size))
        return self(zeros).expand(batch, -1, -1)
