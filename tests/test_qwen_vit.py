"""The Qwen-VL ViT-G visual tokenizer loads the released layouts strictly and computes the documented math.

The reference below is written from the documented architecture with plain tensor operations
(no module of the project): patches by unfolding, per-head interleaved q/k/v, erf GELU, manual
LayerNorms, the attention pool with stacked q|k|v and positions on queries and keys only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components.qwen_resampler import sincos_2d
from lightning_modules.components.qwen_vit import QwenViT, load_qwen_vit, read_qwen_visual_state
from lightning_modules.components.vision_encoder import FrozenVisionEncoder, VisionEncoderConfig
from tools.mini_pretrained import MINI_QWEN, write_qwen_vit_pt, write_qwen_vl_chat


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _resize(table, tokens):
    side, target = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if side == target:
        return table
    grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(tokens, -1)


def reference_tokens(state: dict[str, torch.Tensor], pixels: torch.Tensor, sizes=MINI_QWEN) -> torch.Tensor:
    b, p, width, heads = pixels.shape[0], sizes.patch_size, sizes.width, sizes.heads
    d = width // heads
    patches = F.unfold(pixels, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, 3*p*p), channel-major like a conv
    x = patches @ state["conv1.weight"].reshape(width, -1).T
    n = x.shape[1]
    x = x + _resize(state["positional_embedding"], n)
    x = _layer_norm(x, state["ln_pre.weight"], state["ln_pre.bias"], 1e-6)
    for i in range(sizes.layers):
        s = {k.removeprefix(f"transformer.resblocks.{i}."): v for k, v in state.items() if k.startswith(f"transformer.resblocks.{i}.")}
        h = _layer_norm(x, s["ln_1.weight"], s["ln_1.bias"], 1e-6)
        qkv = (h @ s["attn.in_proj.weight"].T + s["attn.in_proj.bias"]).reshape(b, n, heads, 3 * d)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]  # [q_h | k_h | v_h] for each head
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, n, width)
        x = x + attended @ s["attn.out_proj.weight"].T + s["attn.out_proj.bias"]
        h = _layer_norm(x, s["ln_2.weight"], s["ln_2.bias"], 1e-6) @ s["mlp.c_fc.weight"].T + s["mlp.c_fc.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ s["mlp.c_proj.weight"].T + s["mlp.c_proj.bias"]
    a = {k.removeprefix("attn_pool."): v for k, v in state.items() if k.startswith("attn_pool.")}
    pooled = reference_resampler(a, x, heads=sizes.output_dim // 128, eps=1e-6)
    return _layer_norm(pooled, state["ln_post.weight"], state["ln_post.bias"], 1e-6) @ state["proj"]


def reference_resampler(a: dict[str, torch.Tensor], x: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """Qwen's resampler: queries + positions, keys + positions resized to the input grid, values
    bare; one multi-head attention with stacked q|k|v projections."""
    b, n = x.shape[:2]
    out_dim = a["query"].shape[1]
    d = out_dim // heads
    kv = x @ a["kv_proj.weight"].T if "kv_proj.weight" in a else x
    kv = _layer_norm(kv, a["ln_kv.weight"], a["ln_kv.bias"], eps)
    query = _layer_norm(a["query"], a["ln_q.weight"], a["ln_q.bias"], eps) + a["pos_embed"]
    key = kv + _resize(a["pos_embed"], n)
    wq, wk, wv = a["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = a["attn.in_proj_bias"].chunk(3)
    q = (query @ wq.T + bq).reshape(-1, heads, d)
    k = (key @ wk.T + bk).reshape(b, n, heads, d)
    v = (kv @ wv.T + bv).reshape(b, n, heads, d)
    scores = torch.einsum("qhd,bkhd->bhqk", q, k) / math.sqrt(d)
    pooled = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, -1, out_dim)
    return pooled @ a["attn.out_proj.weight"].T + a["attn.out_proj.bias"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    state = write_qwen_vit_pt(root / "qwen_vit_G.pt")
    assert all(torch.equal(state[k], v) for k, v in write_qwen_vl_chat(root / "Qwen-VL-Chat").items())  # same seed, same tensors
    return root, state


def _pixels(n=2, size=MINI_QWEN.image_size):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def test_the_extracted_file_and_the_qwen_vl_chat_folder_give_the_documented_tokens(release):
    root, state = release
    pixels = _pixels()
    expected = reference_tokens(state, pixels)
    assert expected.shape == (2, MINI_QWEN.num_queries, MINI_QWEN.output_dim)
    for path in (root / "qwen_vit_G.pt", root / "Qwen-VL-Chat"):
        with torch.no_grad():
            tokens = load_qwen_vit(path, MINI_QWEN).eval()(pixels)
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


def test_the_folder_loader_reads_only_the_visual_tensors(release):
    root, state = release
    read = read_qwen_visual_state(root / "Qwen-VL-Chat")  # the LLM-only shard is not a readable file: never opened
    assert sorted(read) == sorted(state)


def test_the_vision_encoder_backend_serves_it_at_the_configured_sizes(release):
    root, state = release
    config = VisionEncoderConfig(backend="qwen_vl", path=str(root / "qwen_vit_G.pt"), image_size=84, patch_size=14,
                                 hidden_size=32, num_layers=2, num_heads=4, intermediate_size=80, output_dim=256, num_queries=16)
    encoder = FrozenVisionEncoder(config)
    assert (encoder.image_size, encoder.num_tokens, encoder.dim) == (84, 16, 256)
    pixels = _pixels()
    torch.testing.assert_close(encoder(pixels), reference_tokens(state, pixels), atol=1e-5, rtol=1e-5)
    assert not list(encoder.parameters()) and not encoder.state_dict()  # frozen: outside parameters and checkpoints


def test_unset_sizes_are_vit_g():
    config = VisionEncoderConfig(backend="qwen_vl")
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_layers, config.num_heads,
            config.intermediate_size, config.output_dim, config.num_queries) == (448, 14, 1664, 48, 16, 8192, 4096, 256)
    with torch.device("meta"):
        tower = QwenViT()
    assert 1.90e9 < sum(p.numel() for p in tower.parameters()) < 1.95e9  # Qwen-VL's ViT-G: ~1.9 B
    assert tower.attn_pool.attn.num_heads == 32 and tower.positional_embedding.shape == (256, 1664)


def test_a_missing_or_misshapen_tensor_is_named(release, tmp_path):
    _, state = release
    missing = dict(state)
    del missing["transformer.resblocks.1.mlp.c_fc.bias"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing \(1\): transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
        load_qwen_vit(tmp_path / "missing.pt", MINI_QWEN)
    wrong = dict(state, proj=state["proj"][:, :128])
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong shape \(1\): proj: \(256, 128\) given, \(256, 256\) expected"):
        load_qwen_vit(tmp_path / "wrong.pt", MINI_QWEN)
    with pytest.raises(FileNotFoundError, match="Qwen-VL-Chat folder"):
        load_qwen_vit(tmp_path, MINI_QWEN)


def test_fixed_positions_follow_the_released_layout():
    """MAE's 2-D sin-cos as the release builds it: meshgrid(w, h), the first half from grid[0]."""
    dim, grid = 16, 3
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = pos.reshape(-1)[:, None] * omega
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    expected = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], 1)
    np.testing.assert_allclose(sincos_2d(dim, grid).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("tokens, kv_dim", [(64, 256), (16, 32)], ids=["mllm-input-64-slots", "grid-kept-with-kv-proj"])
def test_the_mllm_resampler_loads_released_names_and_computes_the_documented_math(tokens, kv_dim):
    """SEED-Story's MLLM resamplers: LayerNorm eps 1e-5, no kv projection when the widths agree."""
    from lightning_modules.components.qwen_resampler import QwenResampler
    from tools.mini_pretrained import random_state

    resampler = QwenResampler(grid=2, embed_dim=256, num_heads=2, kv_dim=kv_dim, norm_eps=1e-5)
    released = random_state(resampler, seed=3)
    assert ("kv_proj.weight" in released) == (kv_dim != 256)
    resampler.load_state_dict(released, strict=True)
    x = torch.randn(3, tokens, kv_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(resampler(x), reference_resampler(released, x, heads=2, eps=1e-5), atol=1e-5, rtol=1e-5)
