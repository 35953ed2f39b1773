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
- ``"qwen_vl"``: SEED-Story's visual tokenizer, the Qwen-VL-Chat ViT-G + attention pool
  (:mod:`lightning_modules.components.qwen_vit`, 448 px -> 256 x 4096), loaded strictly from
  ``path``: the extracted ``qwen_vit_G.pt`` or a local Qwen-VL-Chat folder. Without ``path`` it
  is built with random weights under ``seed`` (benchmarks, tests).

The sizes left unset take the backend's defaults (:data:`BACKEND_SIZES`): the tiny tower's for
``tiny_clip``, ViT-G's for ``qwen_vl``, so a miniature Qwen-VL tower is the same config with
smaller numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.frozen import Frozen
from lightning_modules.components.qwen_vit import QwenViT, QwenViTSizes, load_qwen_vit

log = logging.getLogger(__name__)


Backend = Literal["tiny_clip", "hf", "qwen_vl"]

_TINY = dict(image_size=64, patch_size=8, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
_QWEN = QwenViTSizes()
# what an unset size is, per backend ("hf" reads its tower's own sizes; only image_size is used)
BACKEND_SIZES: dict[str, dict[str, int]] = {
    "tiny_clip": _TINY,
    "hf": _TINY,
    "qwen_vl": dict(image_size=_QWEN.image_size, patch_size=_QWEN.patch_size, hidden_size=_QWEN.width,
                    num_layers=_QWEN.layers, num_heads=_QWEN.heads, intermediate_size=_QWEN.mlp_width,
                    output_dim=_QWEN.output_dim, num_queries=_QWEN.num_queries),
}


@dataclass
class VisionEncoderConfig:
    """How to (re)build the frozen tower; stored in exports instead of its weights. Sizes left
    ``None`` take the backend's defaults (:data:`BACKEND_SIZES`)."""

    backend: Backend = "tiny_clip"
    path: str | None = None  # "hf": a local model folder; "qwen_vl": qwen_vit_G.pt or a Qwen-VL-Chat folder
    image_size: int | None = None
    patch_size: int | None = None
    hidden_size: int | None = None  # the tower's width
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None  # the MLP's width
    seed: int = 0  # init seed of a tower built without weights
    drop_cls: bool = True  # keep only patch tokens (N = (S/P)^2)
    # "tiny_clip" / "hf": pass every token through the tower's final LayerNorm, the space its
    # pooled output was trained in (a contrastively trained CLIP's raw tokens are ~3x the scale)
    post_layernorm: bool = False
    # "tiny_clip" / "hf": read this entry of the tower's hidden states instead of its last layer
    # (LLaVA's vision_select_layer; 0 is the patch embeddings, -2 the layer before the last).
    # Early layers keep each token local to its patch, so a frame edited in one place changes
    # only the tokens there (README, "Not there yet": rows I measure the tiny pipeline on them)
    select_layer: int | None = None
    num_tokens: int | None = None  # adaptive-avg-pool the tokens to this many (None: keep all)
    output_dim: int | None = None  # "hf": the tower's hidden size, when known without loading; "qwen_vl": the pool's width
    num_queries: int | None = None  # "qwen_vl": the attention pool's queries (a square number)

    def __post_init__(self) -> None:
        if self.select_layer is not None and self.backend == "qwen_vl":
            raise ValueError("select_layer applies to the 'tiny_clip' and 'hf' towers; Qwen-VL's is read after its "
                             "attention pool (set select_layer: null)")
        for name, value in BACKEND_SIZES.get(self.backend, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)


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
    if not Path(cfg.path).is_dir():
        raise FileNotFoundError(
            f"vision encoder path {cfg.path} is not a folder; the tiny configs read the visual tokenizer that "
            "`python train.py fit --config configs/tiny/data.yaml --config configs/tiny/visual_tokenizer.yaml` exports "
            "(the quickstart's tokenizer stage)"
        )
    from transformers import AutoConfig, AutoModel, CLIPModel, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    model_type = getattr(config, "model_type", "")
    if model_type == "clip":  # a whole CLIP folder (the tiny tokenizer's export): keep its vision tower
        return CLIPModel.from_pretrained(cfg.path, local_files_only=True).vision_model
    if model_type == "clip_vision_model":
        return CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True)
    if model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel.from_pretrained(cfg.path, local_files_only=True)
    return AutoModel.from_pretrained(cfg.path, local_files_only=True)


def qwen_sizes(cfg: VisionEncoderConfig) -> QwenViTSizes:
    return QwenViTSizes(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.hidden_size, layers=cfg.num_layers,
                        heads=cfg.num_heads, mlp_width=cfg.intermediate_size, output_dim=cfg.output_dim,
                        num_queries=cfg.num_queries)


def _build_qwen_vl(cfg: VisionEncoderConfig) -> nn.Module:
    if cfg.path:
        return load_qwen_vit(cfg.path, qwen_sizes(cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return QwenViT(qwen_sizes(cfg))


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
        # the (N, D) features of the all-zero image: a constant of the frozen tower, kept once computed
        # (or given by an export), so the unconditional branch never needs the tower again
        self.null_cache: torch.Tensor | None = None

    # -- shape -----------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_tokens(self) -> int:
        cfg = self.config
        if cfg.num_tokens is not None:
            return cfg.num_tokens
        if cfg.backend == "qwen_vl":
            return cfg.num_queries
        patches = (cfg.image_size // cfg.patch_size) ** 2
        return patches if cfg.drop_cls else patches + 1

    @property
    def dim(self) -> int:
        cfg = self.config
        if cfg.backend == "qwen_vl":
            return cfg.output_dim
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
        if self.config.select_layer is None:
            out = tower(pixel_values=pixels)
            tokens = out if isinstance(out, torch.Tensor) else out.last_hidden_state  # Qwen-VL's tower returns its tokens
        else:
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            if not -len(hidden) <= self.config.select_layer < len(hidden):
                raise ValueError(f"vision encoder select_layer {self.config.select_layer}: the tower has {len(hidden) - 1} "
                                 f"layers, so its hidden states are 0..{len(hidden) - 1} (or -1..-{len(hidden)})")
            tokens = hidden[self.config.select_layer]
        if self.config.drop_cls and self.config.backend != "qwen_vl":
            tokens = tokens[:, 1:]
        if self.config.post_layernorm:
            tokens = self._final_norm(tower)(tokens)
        if self.config.num_tokens is not None and tokens.shape[1] != self.config.num_tokens:
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.config.num_tokens).transpose(1, 2)
        return tokens

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features put back among those the final LayerNorm can output: each token re-standardised
        through its affine (``(x - bias) / weight`` has zero mean and unit variance over channels for
        every real token). Real features come back unchanged; a regression that shrank a token toward
        the mean (what MSE does where it is unsure) gets its spread back. Needs ``post_layernorm`` and
        the tokens unpooled (an average of normalised tokens is not one).
        """
        self.check_projectable()
        norm = self._final_norm(self.tower)
        weight, bias = norm.weight.to(features), norm.bias.to(features)
        z = (features - bias) / weight
        z = (z - z.mean(-1, keepdim=True)) * torch.rsqrt(z.var(-1, keepdim=True, unbiased=False) + norm.eps)
        return z * weight + bias

    def check_projectable(self) -> None:
        """Fail, naming the settings, where :meth:`project` cannot apply (checked before a story starts)."""
        if not self.config.post_layernorm or self.config.num_tokens is not None:
            raise ValueError("projecting features (generation.project_features) needs a tower read through its final "
                             "LayerNorm, tokens unpooled (vision encoder post_layernorm: true, num_tokens: null); "
                             "set project_features: false for this encoder")

    def _final_norm(self, tower: nn.Module) -> nn.Module:
        owner = getattr(tower, "vision_model", tower)  # where the final norm sits depends on the transformers version
        norm = getattr(owner, "post_layernorm", None)
        if norm is None:
            raise ValueError(f"post_layernorm: the {self.config.backend!r} tower has no post_layernorm "
                             "(CLIP and SigLIP towers do); set post_layernorm: false")
        return norm

    @torch.no_grad()
    def null_features(self, batch: int = 1) -> torch.Tensor:
        """Features of an all-zero ``vit_pixels`` input (as SEED-X feeds for the unconditional branch)."""
        if self.null_cache is None:
            zeros = self._anchor.new_zeros((1, 3, self.image_size, self.image_size))
            self.null_cache = self(zeros)[0].float().cpu()
        return self.null_cache.to(self._anchor.device, self._anchor.dtype)[None].expand(batch, -1, -1)
