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


# -- SD-XL base and a released de-tokenizer ----------------------------------------------------

MINI_ADAPTER_ARGS = [  # the real stage-1 config at miniature widths (the released adapter's layout)
    "--model.init_args.adapter.resampler.dim=32", "--model.init_args.adapter.resampler.depth=2",
    "--model.init_args.adapter.resampler.heads=4", "--model.init_args.adapter.resampler.dim_head=8",
    "--model.init_args.adapter.resampler.num_queries=9", "--model.init_args.adapter.resampler.output_dim=32",
    "--model.init_args.adapter.resampler.ff_mult=2", "--model.init_args.adapter.proj_dims=[24, 40]",
    "--model.init_args.adapter.pooled_dim=40", "--model.init_args.adapter.pool_heads=4",
]
MINI_VISION_ARGS = [f"--model.init_args.vision_encoder.{k}={v}" for k, v in dict(
    path="null", image_size=MINI_QWEN.image_size, patch_size=MINI_QWEN.patch_size, hidden_size=MINI_QWEN.width,
    num_layers=MINI_QWEN.layers, num_heads=MINI_QWEN.heads, intermediate_size=MINI_QWEN.mlp_width,
    output_dim=MINI_QWEN.output_dim, num_queries=MINI_QWEN.num_queries).items()]


def write_mini_sdxl(folder: Path, cross_attention_dim: int = 64, pooled_dim: int = 40, seed: int = 0) -> Path:
    """A ``stable-diffusion-xl-base-1.0``-like folder: a diffusers ``unet/`` with SD-XL's block types
    and ``text_time`` added conditioning, and a ``vae/``, both saved with ``save_pretrained``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=1, cross_attention_dim=cross_attention_dim, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=pooled_dim + 6 * 8,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, scaling_factor=0.13025)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    return folder


def write_released_detokenizer(path: Path, unet: torch.nn.Module, adapter: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A released de-tokenizer ``pytorch_model.bin``: ``unet.*`` with only every attention's
    ``to_k`` / ``to_v`` (changed from the base) and ``resampler.*`` of the released adapter."""
    g = torch.Generator().manual_seed(seed)
    state = {f"unet.{k}": v + 0.1 * torch.randn(v.shape, generator=g)
             for k, v in unet.state_dict().items() if k.endswith(("to_k.weight", "to_v.weight"))}
    state.update({f"resampler.{k}": v for k, v in random_state(adapter.resampler, seed + 1).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state
