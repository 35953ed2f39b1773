"""The Qwen-VL ViT-G visual tokenizer: ``(B, 3, 448, 448)`` -> ``(B, 256, 4096)`` feature tokens.

SEED-Story's (and SEED-X's) visual tokenizer is Qwen-VL-Chat's visual module: a ViT (patch 14,
width 1664, 48 blocks, 16 heads, MLP 8192, exact GELU, LayerNorm eps 1e-6, no CLS token, a
learned 16x16 position table resized bicubically to the patch grid), then an attention pool
(:class:`~lightning_modules.components.qwen_resampler.QwenResampler`, 256 queries at 4096,
``4096 // 128`` heads), ``ln_post`` and ``x @ proj``. The parameter names are those of the
released state dict, so it loads strictly from either file a user has:

- ``qwen_vit_G.pt``: the visual module's state dict without prefix (SEED-Story's extraction);
- a local Qwen-VL-Chat folder: the ``transformer.visual.*`` tensors of its safetensors shards,
  found through the shard index; only those tensors are read (never the 7 B LLM's).

Every size is a constructor argument (the defaults are ViT-G's), so a miniature build is the
same class. Attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.qwen_resampler import QwenResampler, resize_positions
from lightning_modules.components.strict_load import load_strictly

QWEN_PREFIX = "transformer.visual."  # where the visual module sits inside Qwen-VL-Chat
SHARD_INDEX = "model.safetensors.index.json"
POSITION_TABLE = 256  # rows of the learned position table (a 16x16 grid), whatever the image size


@dataclass(frozen=True)
class QwenViTSizes:
    """The sizes of the tower; the defaults are Qwen-VL-Chat's ViT-G."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_width: int = 8192
    output_dim: int = 4096
    num_queries: int = 256


class QwenAttention(nn.Module):
    """Self-attention whose ``in_proj`` output is laid out per head as ``[q_h | k_h | v_h]``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        qkv = self.in_proj(x).view(b, n, self.heads, 3, width // self.heads)  # interleaved per head
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class QwenBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = QwenAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())  # exact (erf) GELU
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class QwenTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList(QwenBlock(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class QwenViT(nn.Module):
    """The visual tokenizer; ``forward(pixel_values)`` -> ``(B, num_queries, output_dim)``."""

    def __init__(self, sizes: QwenViTSizes | None = None):
        super().__init__()
        self.sizes = s = sizes or QwenViTSizes()
        if s.image_size % s.patch_size:
            raise ValueError(f"image_size {s.image_size} is not a multiple of patch_size {s.patch_size}")
        self.conv1 = nn.Conv2d(3, s.width, kernel_size=s.patch_size, stride=s.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(POSITION_TABLE, s.width) * s.width**-0.5)
        self.ln_pre = nn.LayerNorm(s.width, eps=1e-6)
        self.transformer = QwenTransformer(s.width, s.layers, s.heads, s.mlp_width)
        grid = int(round(s.num_queries**0.5))
        self.attn_pool = QwenResampler(grid, s.output_dim, max(1, s.output_dim // 128), kv_dim=s.width, norm_eps=1e-6)
        self.ln_post = nn.LayerNorm(s.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(s.output_dim, s.output_dim) * s.output_dim**-0.5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = x + resize_positions(self.positional_embedding, x.shape[1]).to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(self.attn_pool(x)) @ self.proj


# -- loading the released files ----------------------------------------------------------------


def read_qwen_visual_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The visual module's tensors, un-prefixed, from ``qwen_vit_G.pt`` or a Qwen-VL-Chat folder."""
    path = Path(path)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} is not a state dict of tensors (expected the extracted qwen_vit_G.pt)")
        return state
    index = path / SHARD_INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{path}: neither qwen_vit_G.pt nor a Qwen-VL-Chat folder with {SHARD_INDEX}; "
                                "point vision_encoder.path at one of them")
    from safetensors import safe_open

    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if name.startswith(QWEN_PREFIX):
            by_shard.setdefault(shard, []).append(name)
    if not by_shard:
        raise ValueError(f"{index} names no '{QWEN_PREFIX}*' tensors: is this a Qwen-VL-Chat folder?")
    state = {}
    for shard, names in sorted(by_shard.items()):
        with safe_open(str(path / shard), framework="pt", device="cpu") as handle:
            for name in names:  # only the visual tensors are read; the LLM's stay on disk
                state[name.removeprefix(QWEN_PREFIX)] = handle.get_tensor(name)
    return state


def load_qwen_vit(path: str | Path, sizes: QwenViTSizes | None = None) -> QwenViT:
    """A :class:`QwenViT` of ``sizes`` with the released weights at ``path``, loaded strictly."""
    state = read_qwen_visual_state(path)  # first: a wrong path fails before 1.9 B parameters are allocated
    model = QwenViT(sizes)
    load_strictly(model, state, f"{path} (a Qwen-VL ViT of sizes {model.sizes})")
    return model
