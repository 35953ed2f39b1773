"""A released de-tokenizer converts into the stage-1 export, strictly, and predicts as the release would.

The release here is a miniature in the released layout (``tools/mini_pretrained.py``): SD-XL base as a
diffusers folder, and a ``pytorch_model.bin`` with changed ``to_k`` / ``to_v`` and the adapter.
The expected noise prediction is computed apart from the project's loaders: diffusers' own UNet
from the base folder with the released tensors copied in by name, fed the adapter's documented
math (``tests/test_seed_story_adapter.py``).
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.sdxl_adapter import SDXLAdapter, sdxl_time_ids
from lightning_modules.detokenizer import load_detokenizer
from tests.test_seed_story_adapter import reference
from tools.convert import convert_detokenizer
from tools.mini_pretrained import (
    MINI_ADAPTER_ARGS,
    MINI_QWEN,
    MINI_VISION_ARGS,
    mini_adapter_config,
    write_mini_sdxl,
    write_released_detokenizer,
)

CONFIGS = ["configs/seed_story/data.yaml", "configs/seed_story/stage1_detokenizer.yaml"]
ADAPTER = mini_adapter_config()  # what MINI_ADAPTER_ARGS give the real config


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("release")
    sdxl = write_mini_sdxl(root / "stable-diffusion-xl-base-1.0")
    base = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    state = write_released_detokenizer(root / "detokenizer" / "pytorch_model.bin", base, SDXLAdapter(ADAPTER))
    overrides = [*MINI_VISION_ARGS, *MINI_ADAPTER_ARGS, f"--model.init_args.unet.path={sdxl}", f"--model.init_args.vae_path={sdxl}"]
    return root, sdxl, state, overrides


def test_a_released_detokenizer_converts_and_predicts_as_released(release, tmp_path):
    from diffusers import UNet2DConditionModel

    root, sdxl, state, overrides = release
    out = convert_detokenizer(root / "detokenizer" / "pytorch_model.bin", CONFIGS, tmp_path / "export", overrides)
    module = load_detokenizer(out).eval()

    # independent: diffusers' UNet from the base folder, the released tensors copied in by name
    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet").eval()
    with torch.no_grad():
        params = dict(unet.named_parameters())
        for name, value in state.items():
            if name.startswith("unet."):
                params[name.removeprefix("unet.")].copy_(value)
    features = torch.randn(2, MINI_QWEN.num_queries, MINI_QWEN.output_dim, generator=torch.Generator().manual_seed(3))
    size = torch.full((2, 2), 32)
    time_ids = sdxl_time_ids(size, torch.zeros(2, 2, dtype=torch.long), size)
    tokens, pooled = reference(state, features, ADAPTER)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([10, 700])
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        cond = module.conditioning(features, time_ids)
        predicted = module.unet(x, t, **cond.unet_kwargs()).sample
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=1e-5)
    # only what the release trained differs from SD-XL base
    base = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet").state_dict()
    converted = module.unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k], converted[k])}
    assert changed == {k.removeprefix("unet.") for k in state if k.startswith("unet.")}


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop(next(k for k in s if k.startswith("resampler.layers.1.0.to_q"))), r"missing \(1\): resampler\.layers\.1\.0\.to_q"),
    (lambda s: s.update({"unet.down_blocks.7.attn.to_k.weight": torch.zeros(2, 2)}), r"unexpected \(1\): down_blocks\.7"),
    (lambda s: s.update({"resampler.latents": torch.zeros(1, 8, 32)}), r"wrong shape \(1\): resampler\.latents"),
    (lambda s: s.update({"text_encoder.weight": torch.zeros(1)}), r"outside unet\.\* and resampler\.\*"),
], ids=["missing-adapter-key", "unknown-unet-key", "wrong-shape", "foreign-key"])
def test_a_release_that_does_not_fit_is_refused_naming_the_tensor(release, tmp_path, damage, message):
    root, _, state, overrides = release
    bad = dict(state)
    damage(bad)
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=message):
        convert_detokenizer(tmp_path / "bad.bin", CONFIGS, tmp_path / "export", overrides)
    assert not (tmp_path / "export").exists()


def test_the_command_line_converts_with_extra_arguments_passed_on(release, tmp_path, capsys):
    from tools import convert

    root, _, _, overrides = release
    args = ["detokenizer", "--release", str(root / "detokenizer" / "pytorch_model.bin"),
            *[x for c in CONFIGS for x in ("--config", c)], "--out", str(tmp_path / "export"), *overrides]
    convert.main(args)
    assert f"export written to {tmp_path / 'export'}" in capsys.readouterr().out
    assert load_detokenizer(tmp_path / "export").adapter_config.layout == "seed_story"
