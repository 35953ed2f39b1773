"""Unit tests of the stage-1 components: perceiver, SD-XL adapter, vision encoder, metrics."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from evaluation.reconstruction import reconstruction_metrics
from lightning_modules.components.perceiver import PerceiverConfig, PerceiverResampler
from lightning_modules.components.sdxl_adapter import (
    SDXLAdapter,
    SDXLAdapterConfig,
    condition_dropout,
    sdxl_time_ids,
)
from lightning_modules.components.vision_encoder import FrozenVisionEncoder, VisionEncoderConfig

SMALL_VIT = VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def test_perceiver_maps_any_token_count_to_num_queries():
    cfg = PerceiverConfig(input_dim=24, dim=32, depth=2, heads=4, dim_head=8, num_queries=5, output_dim=7, ff_mult=2)
    resampler = PerceiverResampler(cfg)
    for tokens in (1, 10, 300):
        assert resampler(torch.randn(3, tokens, 24)).shape == (3, 5, 7)
    # stage 2 passes its own queries (e.g. LLM hidden states): the count follows them
    assert resampler(torch.randn(2, 10, 24), queries=torch.randn(2, 9, 32)).shape == (2, 9, 7)


def test_perceiver_output_depends_on_input():
    resampler = PerceiverResampler(PerceiverConfig(input_dim=8, dim=16, heads=2, dim_head=8, num_queries=4, output_dim=16))
    a, b = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    assert not torch.allclose(resampler(a), resampler(b))


def test_adapter_shapes_and_time_ids_order():
    cfg = SDXLAdapterConfig(
        resampler=PerceiverConfig(input_dim=12, dim=16, depth=1, heads=2, dim_head=8, num_queries=6, output_dim=16),
        proj_dims=(10, 14),
        pooled_dim=14,
        pool_heads=2,
    )
    original = torch.tensor([[480, 768], [64, 64]])
    crop = torch.tensor([[3, 5], [0, 0]])
    target = torch.tensor([[1024, 1024], [64, 64]])
    time_ids = sdxl_time_ids(original, crop, target)
    assert time_ids.tolist() == [[480, 768, 3, 5, 1024, 1024], [64, 64, 0, 0, 64, 64]]
    cond = SDXLAdapter(cfg)(torch.randn(2, 9, 12), time_ids)
    assert cond.encoder_hidden_states.shape == (2, 6, 24)  # the two projections concatenated
    assert cond.text_embeds.shape == (2, 14)
    assert torch.equal(cond.time_ids, time_ids)
    assert set(cond.unet_kwargs()["added_cond_kwargs"]) == {"text_embeds", "time_ids"}


def test_condition_dropout_replaces_exactly_the_dropped_rows_with_null_features():
    features = torch.randn(64, 4, 3)
    null = torch.zeros(1, 4, 3) + 7.0
    out, drop = condition_dropout(features, null, 0.5, torch.Generator().manual_seed(0))
    assert 10 < drop.sum() < 54
    assert torch.equal(out[drop], null.expand(int(drop.sum()), -1, -1))
    assert torch.equal(out[~drop], features[~drop])
    kept, none_dropped = condition_dropout(features, null, 0.0)
    assert not none_dropped.any() and torch.equal(kept, features)
    all_null, _ = condition_dropout(features, null, 1.0)
    assert (all_null == 7.0).all()


def test_vision_encoder_is_frozen_outside_module_tree_and_deterministic():
    enc = FrozenVisionEncoder(SMALL_VIT)
    x = torch.randn(2, 3, 32, 32)
    feats = enc(x)
    assert feats.shape == (2, enc.num_tokens, enc.dim) == (2, 16, 32)
    assert not feats.requires_grad
    assert list(enc.parameters()) == [] and enc.state_dict() == {}
    assert all(not p.requires_grad for p in enc.tower.parameters())
    enc.train()
    assert not enc.tower.training  # stays in eval mode
    # the same seed rebuilds the same tower (that is why its weights are never saved)
    assert torch.equal(FrozenVisionEncoder(SMALL_VIT)(x), feats)
    other = VisionEncoderConfig(**{**SMALL_VIT.__dict__, "seed": 1})
    assert not torch.allclose(FrozenVisionEncoder(other)(x), feats)
    # .to() reaches the hidden tower
    enc.to(torch.float64)
    assert next(enc.tower.parameters()).dtype == torch.float64


def test_vision_encoder_pooling_and_size_check():
    enc = FrozenVisionEncoder(VisionEncoderConfig(**{**SMALL_VIT.__dict__, "num_tokens": 4}))
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32)
    with pytest.raises(ValueError, match="vit_image_size"):
        enc(torch.randn(1, 3, 64, 64))
    null = enc.null_features(3)
    assert null.shape == (3, 4, 32) and torch.equal(null[0], enc(torch.zeros(1, 3, 32, 32))[0])


def test_hf_backend_reads_the_vision_tower_of_a_whole_clip_folder_through_its_final_norm(tmp_path):
    """The tiny visual tokenizer's export is a whole CLIP folder: the encoder keeps its vision tower,
    and post_layernorm passes every patch token through the tower's final LayerNorm."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).eval()
    clip.save_pretrained(str(tmp_path / "clip"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = clip.vision_model(pixel_values=x).last_hidden_state[:, 1:]
        normed = clip.vision_model.post_layernorm(tokens)
    config = dict(backend="hf", path=str(tmp_path / "clip"), image_size=32)
    torch.testing.assert_close(FrozenVisionEncoder(VisionEncoderConfig(**config))(x), tokens)
    torch.testing.assert_close(FrozenVisionEncoder(VisionEncoderConfig(**config, post_layernorm=True))(x), normed)
    assert not torch.allclose(tokens, normed)


def test_select_layer_reads_an_earlier_hidden_state_and_layer_zero_keeps_tokens_local():
    config = replace(SMALL_VIT, num_layers=2)
    last = FrozenVisionEncoder(config)
    first = FrozenVisionEncoder(replace(config, select_layer=0))
    x = torch.randn(2, 3, 32, 32)
    vision = getattr(last.tower, "vision_model", last.tower)  # where it sits depends on the transformers version
    with torch.no_grad():  # the patch embeddings through the tower's first norm, as CLIP feeds its encoder
        expected = vision.pre_layrnorm(vision.embeddings(x))[:, 1:]
    torch.testing.assert_close(first(x), expected)
    torch.testing.assert_close(FrozenVisionEncoder(replace(config, select_layer=-1))(x), last(x))
    # one patch edited: every token of the last layer moves, only that patch's token of layer 0
    edited = x.clone()
    edited[:, :, :8, :8] += 1.0

    def moved(enc):  # per image, how many tokens the edit changed
        return ((enc(edited) - enc(x)).abs().amax(-1) > 1e-5).sum(-1).tolist()

    assert moved(first) == [1, 1] and moved(last) == [16, 16]
    with pytest.raises(ValueError, match="select_layer 3: the tower has 2 layers"):
        FrozenVisionEncoder(replace(config, select_layer=3))(x)
    with pytest.raises(ValueError, match="select_layer"):
        VisionEncoderConfig(backend="qwen_vl", select_layer=0)


def test_hf_backend_names_a_missing_folder_and_the_command_that_makes_it(tmp_path):
    enc = FrozenVisionEncoder(VisionEncoderConfig(backend="hf", path=str(tmp_path / "nowhere"), image_size=32))
    with pytest.raises(FileNotFoundError, match="configs/tiny/visual_tokenizer.yaml"):
        enc(torch.zeros(1, 3, 32, 32))


def test_qwen_vl_backend_has_vit_g_shape_and_names_a_wrong_weights_path(tmp_path):
    enc = FrozenVisionEncoder(VisionEncoderConfig(backend="qwen_vl", path=str(tmp_path / "nowhere")))
    assert (enc.num_tokens, enc.dim, enc.image_size) == (256, 4096, 448)  # known without building the tower
    with pytest.raises(FileNotFoundError, match="Qwen-VL-Chat folder"):
        enc(torch.zeros(1, 3, 448, 448))


def test_reconstruction_metrics_order_good_and_bad_reconstructions():
    metrics = reconstruction_metrics()
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    metrics.update(target, target)
    same = metrics.compute()
    metrics.reset()
    metrics.update((target + 0.2 * torch.randn_like(target)).clamp(-1, 1), target)
    noisy = metrics.compute()
    assert "lpips_randnet" in same  # the fallback is labelled as such
    assert same["lpips_randnet"] == pytest.approx(0.0, abs=1e-6) and noisy["lpips_randnet"] > 0
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert noisy["ssim"] < 0.99
    assert 10 < noisy["psnr"] < 30
    assert metrics.state_dict() == {}  # the LPIPS net is not checkpointed


def test_keyed_training_noise_does_not_depend_on_the_batch_it_is_in():
    from lightning_modules.components.noise import draw_training_noise, sample_key

    keys = [sample_key(0, 7, story, frame) for story, frame in [("a", 1), ("b", 2), ("c", 3), ("d", 4)]]
    whole = draw_training_noise((4, 3, 8, 8), 1000, 0.5, keys=keys)
    halves = [draw_training_noise((2, 3, 8, 8), 1000, 0.5, keys=keys[i : i + 2]) for i in (0, 2)]
    assert torch.equal(whole.noise, torch.cat([h.noise for h in halves]))
    assert torch.equal(whole.timesteps, torch.cat([h.timesteps for h in halves]))
    assert torch.equal(whole.drop, torch.cat([h.drop for h in halves]))
    other_step = draw_training_noise((4, 3, 8, 8), 1000, 0.5, keys=[sample_key(0, 8, s, f) for s, f in [("a", 1), ("b", 2), ("c", 3), ("d", 4)]])
    assert not torch.equal(whole.noise, other_step.noise)
    assert 0.0 < float(whole.noise.std()) and whole.timesteps.min() >= 0 and whole.timesteps.max() < 1000


def test_position_grid_tells_every_location_apart_and_is_appended_to_the_unet_input():
    from lightning_modules.components.sampling import position_grid, unet_input

    grid = position_grid(8, 16, 16)
    assert grid.shape == (8, 16, 16) and grid.abs().max() <= 1
    codes = grid.flatten(1).T  # (256 locations, 8)
    assert torch.cdist(codes, codes).add(torch.eye(256) * 10).min() > 1e-3  # no two locations share a code
    latents = torch.randn(2, 48, 16, 16)
    assert unet_input(latents, 0) is latents
    stacked = unet_input(latents, 8)
    assert stacked.shape == (2, 56, 16, 16) and torch.equal(stacked[:, :48], latents) and torch.equal(stacked[1, 48:], grid)
    with pytest.raises(ValueError, match="multiple of 4"):
        position_grid(6, 4, 4)


def test_spatial_map_puts_each_token_where_its_patch_was():
    from lightning_modules.components.sampling import unet_input

    cfg = SDXLAdapterConfig(
        resampler=PerceiverConfig(input_dim=12, dim=16, depth=1, heads=2, dim_head=8, num_queries=16, output_dim=16,
                                  queries_from_input=True),
        proj_dims=(10, 14), pooled_dim=14, pool_heads=2, spatial_channels=3, spatial_upscale=2,
    )
    torch.manual_seed(0)
    adapter = SDXLAdapter(cfg).eval()
    tokens = torch.randn(1, 16, 16)  # a 4x4 grid of resampler outputs
    spatial = adapter.spatial_map(tokens)
    assert spatial.shape == (1, 3, 8, 8)  # 4x4 tokens, each a 2x2 block
    changed = tokens.clone()
    # another token at row 1, column 2 of the grid (not a constant shift, which the head's LayerNorm removes)
    changed[0, 6] = torch.randn(16)
    diff = (adapter.spatial_map(changed) - spatial).abs().sum(1)[0]
    assert diff[2:4, 4:6].min() > 0 and diff.sum() == diff[2:4, 4:6].sum()  # only that token's block moves
    cond = adapter(torch.randn(2, 16, 12), torch.zeros(2, 6))
    assert cond.spatial.shape == (2, 3, 8, 8)
    both = type(cond).cat([cond, cond])
    assert both.spatial.shape == (4, 3, 8, 8) and "spatial" not in both.unet_kwargs()
    # appended after the latents and position maps, resized to the latents' size
    stacked = unet_input(torch.randn(2, 48, 16, 16), 4, cond.spatial)
    assert stacked.shape == (2, 55, 16, 16)
    resized = torch.nn.functional.interpolate(cond.spatial, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(stacked[:, 52:], resized)
    with pytest.raises(ValueError, match="queries_from_input"):
        SDXLAdapter(SDXLAdapterConfig(resampler=PerceiverConfig(num_queries=16), spatial_channels=3))


def test_perceiver_queries_from_input_keep_the_token_order():
    from lightning_modules.components.perceiver import PerceiverConfig, PerceiverResampler

    torch.manual_seed(0)
    resampler = PerceiverResampler(PerceiverConfig(input_dim=8, dim=16, depth=0, num_queries=6, output_dim=8,
                                                   queries_from_input=True))
    x = torch.randn(1, 6, 8)
    y = x.clone()
    y[0, 4] += 1.0
    changed = (resampler(x) - resampler(y)).abs().sum(-1)[0]
    assert changed[4] > 0 and torch.all(changed[[0, 1, 2, 3, 5]] == 0)
    with pytest.raises(ValueError, match="num_queries == input tokens"):
        resampler(torch.randn(1, 5, 8))


def test_project_keeps_real_features_and_gives_a_shrunken_regression_its_spread_back():
    enc = FrozenVisionEncoder(VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                                  intermediate_size=64, post_layernorm=True))
    norm = enc._final_norm(enc.tower)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained tower's affine, not the identity
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.3)
    real = enc(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(enc.project(real), real, atol=1e-4, rtol=1e-4)
    shrunk = norm.bias + 0.7 * (real - norm.bias)  # what MSE regression does to a token it is unsure of
    torch.testing.assert_close(enc.project(shrunk), real, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="post_layernorm"):
        FrozenVisionEncoder(VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                                intermediate_size=64)).project(real)
