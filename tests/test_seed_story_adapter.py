"""The released de-tokenizer adapter: the release's names, loaded strictly, and the documented math.

The reference is plain tensor operations from the documented architecture (SEED-X's
``ResamplerXLV2``): token-axis normalisation, perceiver attention with q and k each scaled by
``d^-1/4`` and a float32 softmax, bias-free feed-forwards, no output projection, and the
mean-token attention pool through ``F.multi_head_attention_forward``'s math written out.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components.perceiver import PerceiverConfig
from lightning_modules.components.sdxl_adapter import SDXLAdapter, SDXLAdapterConfig
from tools.mini_pretrained import random_state

MINI = SDXLAdapterConfig(layout="seed_story", proj_dims=(24, 40), pooled_dim=40, pool_heads=4,
                         resampler=PerceiverConfig(input_dim=48, dim=32, depth=2, heads=4, dim_head=8, num_queries=9, ff_mult=2))


def released_names(depth: int) -> set[str]:
    """The ``resampler.*`` names of a released de-tokenizer ``pytorch_model.bin`` (from the reference's layout)."""
    names = {"latents", "proj_in.weight", "proj_in.bias", "norm_out.weight", "norm_out.bias",
             "unet_proj_1.weight", "unet_proj_1.bias", "unet_proj_2.weight", "unet_proj_2.bias",
             "unet_attnpool.positional_embedding"}
    names |= {f"unet_attnpool.{p}_proj.{w}" for p in "qkvc" for w in ("weight", "bias")}
    for i in range(depth):
        names |= {f"layers.{i}.0.{n}.{w}" for n in ("norm1", "norm2") for w in ("weight", "bias")}
        names |= {f"layers.{i}.0.{n}.weight" for n in ("to_q", "to_kv", "to_out")}
        names |= {f"layers.{i}.1.0.weight", f"layers.{i}.1.0.bias", f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight"}
    return {f"resampler.{n}" for n in names}


def _ln(x, s, name):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"])


def reference(state: dict[str, torch.Tensor], x: torch.Tensor, c: SDXLAdapterConfig = MINI):
    r, s = c.resampler, {k.removeprefix("resampler."): v for k, v in state.items()}
    b = x.shape[0]
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)  # dim=1 of (B, N, D): the token axis
    x = x @ s["proj_in.weight"].T + s["proj_in.bias"]
    latents = s["latents"].repeat(b, 1, 1)
    for i in range(r.depth):
        p = f"layers.{i}.0"
        feats, lat = _ln(x, s, f"{p}.norm1"), _ln(latents, s, f"{p}.norm2")
        q = lat @ s[f"{p}.to_q.weight"].T
        k, v = (torch.cat([feats, lat], 1) @ s[f"{p}.to_kv.weight"].T).chunk(2, -1)
        q, k, v = (t.view(b, t.shape[1], r.heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(r.dim_head))
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), -1)
        latents = latents + (weight @ v).permute(0, 2, 1, 3).reshape(b, -1, r.heads * r.dim_head) @ s[f"{p}.to_out.weight"].T
        h = F.gelu(_ln(latents, s, f"layers.{i}.1.0") @ s[f"layers.{i}.1.1.weight"].T)
        latents = latents + h @ s[f"layers.{i}.1.3.weight"].T
    hidden = _ln(latents, s, "norm_out")
    tokens = torch.cat([hidden @ s["unet_proj_1.weight"].T + s["unet_proj_1.bias"],
                        hidden @ s["unet_proj_2.weight"].T + s["unet_proj_2.bias"]], -1)
    # pool: mean token first, positions, every token a query; the mean token's output
    a = {k.removeprefix("unet_attnpool."): v for k, v in s.items() if k.startswith("unet_attnpool.")}
    t = torch.cat([hidden.mean(1, keepdim=True), hidden], 1) + a["positional_embedding"]
    heads, d = c.pool_heads, r.dim // c.pool_heads
    q, k, v = ((t @ a[f"{n}_proj.weight"].T + a[f"{n}_proj.bias"]).view(b, -1, heads, d).transpose(1, 2) for n in "qkv")
    out = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1) @ v).transpose(1, 2).reshape(b, -1, r.dim)
    pooled = out[:, 0] @ a["c_proj.weight"].T + a["c_proj.bias"]
    return tokens, pooled


def test_the_released_names_load_strictly_and_give_the_documented_conditioning():
    adapter = SDXLAdapter(MINI)
    state = {f"resampler.{k}": v for k, v in random_state(adapter.resampler, seed=4).items()}
    assert set(state) == released_names(MINI.resampler.depth)
    adapter.load_state_dict(state, strict=True)
    x = torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(1)) * 3
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        cond = adapter(x, time_ids)
    tokens, pooled = reference(state, x)
    assert cond.encoder_hidden_states.shape == (2, 9, 64) and cond.text_embeds.shape == (2, 40) and cond.spatial is None
    torch.testing.assert_close(cond.encoder_hidden_states, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.text_embeds, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.time_ids, time_ids)


def test_the_project_only_options_are_refused():
    import dataclasses

    with pytest.raises(ValueError, match="no spatial map"):
        SDXLAdapter(dataclasses.replace(MINI, spatial_channels=8))


def test_the_real_config_builds_the_released_adapter_at_its_published_size():
    from tests.conftest import config_command
    from tools.cli import cli_main

    cli = cli_main([*config_command("configs/seed_story/stage1_detokenizer.yaml")[1:], "--model.init_args.unet.meta_init=true",
                    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"], run=False)
    adapter = cli.model.adapter
    assert set(adapter.state_dict()) == released_names(4)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes["resampler.latents"] == (1, 64, 1024) and shapes["resampler.proj_in.weight"] == (1024, 4096)
    assert shapes["resampler.layers.0.1.1.weight"] == (4096, 1024) and shapes["resampler.unet_proj_2.weight"] == (1280, 1024)
    assert shapes["resampler.unet_attnpool.positional_embedding"] == (65, 1024)
    assert shapes["resampler.unet_attnpool.c_proj.weight"] == (1280, 1024)
