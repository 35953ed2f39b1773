"""GPU smoke tests (``pytest -m gpu``): each stage in bf16 at reduced depth, the real VAE codec, the sink on CUDA.

Skipped where no CUDA device is present (``tests/conftest.py``); the shapes are the project's own
small test models, the numerics the GPU's (bf16 autocast, SDPA kernels).
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings
from tests.test_detokenizer import fake_batch, small_module
from tests.test_stage3_generation import _stage3, _stories_batch, exports  # noqa: F401  (fixture)
from tests.test_story_mllm import _batch, _module, tokenizer_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _finite_grads(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    return bool(grads) and all(torch.isfinite(g).all() for g in grads)


def test_stage1_bf16_forward_backward():
    module = small_module(train_unet="kv").to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module._shared_step(_to(fake_batch(2), CUDA), "val")
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(module)


def test_stage2_bf16_forward_backward(tiny_world, tokenizer_dir):  # noqa: F811
    module = _module(tokenizer_dir, supervise="all").to(CUDA)
    batch = _to(_batch(tiny_world, n=2, max_images=3), CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = module.losses(module.forward_story(batch))
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and _finite_grads(module)


def test_stage3_bf16_forward_backward_and_a_sink_story_on_cuda(tiny_world, exports):  # noqa: F811
    module = _stage3(exports, train_unet="kv").to(CUDA)
    batch = _to(_stories_batch(tiny_world, n=2, frames=3), CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module._shared_step(batch, "val")
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(module.detokenizer)
    settings = GenerationSettings(steps=6, num_inference_steps=2, guidance_scale=2.0, context=ContextPolicy(mode="sink"))
    story = module.eval().generate_story(batch["vit_pixels"][0, :1], batch["captions"][0][:1], settings=settings)
    assert len(story.steps) == 7 and all(s.image.is_cuda and torch.isfinite(s.image).all() for s in story.steps[1:])


def test_sdxl_vae_codec_round_trip_shapes_and_scaling():
    """SD-XL's VAE architecture (random weights, no download) through the project's codec at 256 px."""

    from lightning_modules.components.codecs import VAECodec, sdxl_vae_architecture

    vae = sdxl_vae_architecture()
    codec = VAECodec(vae).to(CUDA, torch.bfloat16)
    pixels = torch.rand(2, 3, 256, 256, device=CUDA) * 2 - 1
    latents = codec.encode(pixels.to(torch.bfloat16))
    assert latents.shape == (2, 4, 32, 32) and codec.downscale == 8 and codec.scaling_factor == pytest.approx(0.13025)
    assert codec.decode(latents).shape == (2, 3, 256, 256)
    assert not list(codec.parameters()) and not codec.state_dict()  # frozen: never trained, never checkpointed


def test_offloaded_story_is_the_resident_story_with_real_device_moves(tiny_world, exports):  # noqa: F811
    import dataclasses

    from lightning_modules.components.story_generator import StoryGenerator

    module = _stage3(exports).to(CUDA).eval()
    batch = _stories_batch(tiny_world, n=1, frames=2)
    start, caption = batch["vit_pixels"][0, :1], batch["captions"][0][:1]
    settings = GenerationSettings(steps=3, num_inference_steps=2, guidance_scale=2.0)
    resident = StoryGenerator(module.mllm, module.detokenizer, settings, CUDA).generate(start, caption)
    generator = StoryGenerator(module.mllm, module.detokenizer, dataclasses.replace(settings, offload=True), CUDA)
    offloaded = generator.generate(start, caption)
    assert offloaded.captions == resident.captions
    for a, b in zip(resident.steps[1:], offloaded.steps[1:]):
        torch.testing.assert_close(b.image, a.image, atol=1e-5, rtol=0)
    assert generator.placement.moves == [("detokenizer", "cpu"), ("mllm", "cpu"), ("detokenizer", "device")]
    assert module.mllm.device.type == "cpu" and module.detokenizer.device.type == "cuda"


def test_compiled_unet_draws_the_eager_images(tiny_world, exports):  # noqa: F811
    import dataclasses

    module = _stage3(exports).to(CUDA).eval()
    batch = _stories_batch(tiny_world, n=1, frames=2)
    start, caption = batch["vit_pixels"][0, :1], batch["captions"][0][:1]
    settings = GenerationSettings(steps=2, num_inference_steps=4, guidance_scale=2.0)
    eager = module.generate_story(start, caption, settings=settings)
    compiled = module.generate_story(start, caption, settings=dataclasses.replace(settings, compile_unet=True))
    assert module.detokenizer.unet._compiled_call_impl is not None and compiled.captions == eager.captions
    for a, b in zip(eager.steps[1:], compiled.steps[1:]):
        torch.testing.assert_close(b.image, a.image, atol=1e-3, rtol=0)  # fused kernels reorder float sums only
