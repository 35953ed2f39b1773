"""Miniature files in the layouts of the released SEED-Story inputs, with random asymmetric weights.

Nothing real is downloaded or shipped: each writer makes, at tiny widths, a file laid out as the
release lays out its own (names, prefixes, shard index), so the loaders are tested on the real
formats. Every tensor, LayerNorms and biases included, is random, so a weight that is dropped,
transposed or read from the wrong place changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_modules.components.qwen_vit import QWEN_PREFIX, SHARD_INDEX, QwenViT, QwenViTSizes

MINI_QWEN = QwenViTSizes(image_size=84, patch_size=14, width=32, layers=2, heads=4, mlp_width=80, output_dim=256, num_queries=16)


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``module``'s state dict (names and shapes; it may live on ``meta``) with every entry drawn at
    random, scaled by the fan-in to keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        fan_in = tensor.shape[-1] if tensor.dim() > 1 else 1
        state[name] = (torch.randn(tensor.shape, generator=g) / fan_in**0.5).to(tensor.dtype)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_q.weight", "ln_kv.weight")):
            state[name] = 1 + 0.3 * torch.randn(tensor.shape, generator=g)  # norms around 1, not 0
    return state


def qwen_visual_state(sizes: QwenViTSizes = MINI_QWEN, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # only names and shapes are read
        model = QwenViT(sizes)
    return random_state(model, seed)


def write_qwen_vit_pt(path: Path, sizes: QwenViTSizes = MINI_QWEN, seed: int = 0) -> dict[str, torch.Tensor]:
    """SEED-Story's extracted ``qwen_vit_G.pt``: the visual module's state dict, no prefix."""
    state = qwen_visual_state(sizes, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def write_qwen_vl_chat(folder: Path, sizes: QwenViTSizes = MINI_QWEN, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Qwen-VL-Chat-like folder: ``transformer.visual.*`` split over two safetensors shards with
    LLM tensors beside them, a third shard of LLM tensors only (deliberately not a readable file:
    a loader that opens it fails), and the shard index."""
    state = qwen_visual_state(sizes, seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00003.safetensors": {**{QWEN_PREFIX + n: state[n] for n in names[:half]},
                                              "transformer.wte.weight": torch.randn(8, 4)},
        "model-00002-of-00003.safetensors": {**{QWEN_PREFIX + n: state[n] for n in names[half:]},
                                              "transformer.h.0.attn.c_attn.weight": torch.randn(4, 4)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / shard))
        weight_map.update({k: shard for k in tensors})
    (folder / "model-00003-of-00003.safetensors").write_bytes(b"the 7 B LLM's layers: never read by the visual loader")
    weight_map.update({f"transformer.h.{i}.mlp.w1.weight": "model-00003-of-00003.safetensors" for i in range(1, 4)})
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return state
