"""The de-tokenizer's UNet: where it comes from, what of it trains, and its export copy."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn

TrainUNet = Literal["none", "kv", "lora", "full"]
SDXL_UNET_CONFIG = Path(__file__).with_name("sdxl_unet_config.json")
TIME_IDS = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)


@dataclass
class UNetSpec:
    """Where the UNet comes from.

    ``path``: a local diffusers pipeline folder (``from_pretrained(path, subfolder)``). Otherwise the
    architecture comes from ``config`` (a dict, or a JSON file path such as
    ``lightning_modules/components/sdxl_unet_config.json``) with random init. ``meta_init`` builds
    the architecture on the ``meta`` device without any weights (config checks, parameter counts).
    """

    path: str | None = None
    subfolder: str = "unet"
    config: dict[str, Any] | str | None = None
    meta_init: bool = False
    init_seed: int = 0  # random init from ``config`` under this seed: the same weights on any rank count


def load_unet_config(config: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(config, str):
        return json.loads(Path(config).read_text())
    return dict(config)


def build_unet(spec: UNetSpec, cross_attention_dim: int, pooled_dim: int,
               channels: tuple[int, int] | None = None) -> UNet2DConditionModel:
    """Build the UNet and check it accepts the adapter's conditioning widths.

    ``channels`` (in, out) fill a config's ``in_channels`` / ``out_channels`` when it leaves them out.
    """
    if spec.path is not None and not spec.meta_init:
        unet = UNet2DConditionModel.from_pretrained(spec.path, subfolder=spec.subfolder, local_files_only=True)
    else:
        if spec.config is None:
            if spec.path is None:
                raise ValueError("unet: give `path` (local weights) or `config` (architecture)")
            config_file = Path(spec.path) / spec.subfolder / "config.json"
            config = json.loads(config_file.read_text())
        else:
            config = load_unet_config(spec.config)
        config = _fit_conditioning(config, cross_attention_dim, pooled_dim)
        if channels is not None:
            config.setdefault("in_channels", channels[0])
            config.setdefault("out_channels", channels[1])
        with torch.device("meta") if spec.meta_init else contextlib.nullcontext(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            unet = UNet2DConditionModel.from_config(config)
    _check_conditioning(unet.config, cross_attention_dim, pooled_dim)
    return unet


def _fit_conditioning(config: dict[str, Any], cross_attention_dim: int, pooled_dim: int) -> dict[str, Any]:
    """Fill the conditioning widths from the adapter when the config leaves them out (tiny configs)."""
    config = dict(config)
    config.setdefault("addition_embed_type", "text_time")
    config.setdefault("cross_attention_dim", cross_attention_dim)
    if config.get("projection_class_embeddings_input_dim") is None:
        config["projection_class_embeddings_input_dim"] = pooled_dim + TIME_IDS * config.get("addition_time_embed_dim", 256)
    return config


def _check_conditioning(config: Any, cross_attention_dim: int, pooled_dim: int) -> None:
    expected = pooled_dim + TIME_IDS * config.addition_time_embed_dim
    if config.cross_attention_dim != cross_attention_dim or config.projection_class_embeddings_input_dim != expected:
        raise ValueError(
            f"the UNet expects cross_attention_dim={config.cross_attention_dim} and "
            f"projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}, but the adapter "
            f"gives {cross_attention_dim} and {expected} (pooled {pooled_dim} + 6 x {config.addition_time_embed_dim}): "
            f"fix adapter.proj_dims / adapter.pooled_dim"
        )


def select_trainable(unet: nn.Module, mode: TrainUNet, lora_rank: int = 8, lora_alpha: int | None = None) -> list[str]:
    """Freeze the UNet then unfreeze what ``mode`` says; returns the trainable parameter names."""
    unet.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig

        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha or lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
        unet.add_adapter(config)  # diffusers' PEFT integration; only LoRA weights require grad
    for name, param in unet.named_parameters():
        if mode == "full" or (mode == "kv" and name.endswith(("to_k.weight", "to_v.weight", "to_k.bias", "to_v.bias"))):
            param.requires_grad_(True)
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def merged_unet_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain UNet2DConditionModel (LoRA, if any, fused into its base weights) for export."""
    import copy

    unet = copy.deepcopy(unet)
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.fuse_lora()
        unet.unload_lora()
    return unet
