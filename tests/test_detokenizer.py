"""Stage 1 (de-tokenizer): CLI run, trainable sets, CFG dropout, export round trip, real config on meta."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.data import DataLoader, IterableDataset

from evaluation.reconstruction import psnr
from lightning_modules.components.noise import NoiseSpec
from lightning_modules.components.perceiver import PerceiverConfig
from lightning_modules.components.sdxl_adapter import SDXLAdapterConfig
from lightning_modules.components.unet import UNetSpec
from lightning_modules.components.vision_encoder import VisionEncoderConfig
from lightning_modules.detokenizer import DetokenizerModule, load_detokenizer
from tests.conftest import config_command, tiny_detokenizer_args, tiny_init_args, tower_args

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "stage1_detokenizer.yaml"
REAL_CONFIG = ROOT / "configs" / "seed_story" / "stage1_detokenizer.yaml"
SDXL_UNET_PARAMS = 2_567_463_684

# the tiny config's UNet, narrower (its channels come from the codec: 64 px folded 4x4 -> 48)
SMALL_UNET = {**tiny_init_args(str(TINY_CONFIG))["unet"]["config"], "block_out_channels": [32, 32, 64], "attention_head_dim": [2, 2, 4]}


def small_module(**overrides) -> DetokenizerModule:
    """A seconds-fast de-tokenizer: 32 px ViT view, small UNet over 64 px pixels folded 4x4."""
    kwargs = dict(
        vision_encoder=VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        adapter=SDXLAdapterConfig(
            resampler=PerceiverConfig(input_dim=32, dim=32, depth=1, heads=2, dim_head=16, num_queries=8, output_dim=32),
            proj_dims=(16, 32),
            pooled_dim=32,
            pool_heads=2,
        ),
        unet=UNetSpec(config=SMALL_UNET),
        train_unet="kv",
        val_images=2,
        val_inference_steps=2,
    )
    kwargs.update(overrides)
    module = DetokenizerModule(**kwargs)
    module.configure_model()
    return module


def fake_batch(n: int = 2, vit: int = 32, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "vit_pixels": torch.randn(n, 3, vit, vit, generator=g),
        "pixels": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "original_size": torch.full((n, 2), size),
        "crop_top_left": torch.zeros(n, 2, dtype=torch.long),
        "target_size": torch.full((n, 2), size),
        "captions": ["x"] * n,
        "story_id": [str(i) for i in range(n)],
        "frame_index": torch.arange(n),
    }


def cli_args(world: Path, root: Path, tower: Path, *extra: str) -> list[str]:
    return [
        *config_command(str(TINY_CONFIG)),
        *tower_args(tower),
        f"--data.init_args.train_files={world / 'train.jsonl'}",
        f"--data.init_args.val_files={world / 'val.jsonl'}",
        f"--data.init_args.test_files={world / 'test.jsonl'}",
        f"--data.init_args.image_root={world / 'images'}",
        "--data.init_args.synthetic=null",  # the test's world is made by the fixture
        f"--trainer.default_root_dir={root}",
        f"--model.init_args.export_dir={root / 'export'}",  # never the user's runs/ folder
        *extra,
    ]


# -- the CLI ---------------------------------------------------------------------------------


def test_tiny_config_fast_dev_run(tiny_world: Path, tiny_tower: Path, tmp_path: Path):
    from tools.cli import cli_main

    cli = cli_main(
        cli_args(
            tiny_world,
            tmp_path,
            tiny_tower,
            "--trainer.fast_dev_run=true",
            "--data.init_args.batch_size=4",
            "--model.init_args.val_images=2",
            "--model.init_args.val_inference_steps=2",
        )
    )
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert {"val/psnr", "val/ssim", "val/lpips_randnet"} <= set(metrics)
    grid = cli.model.last_reconstructions
    assert grid is not None and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
    # the frozen tower never reaches a checkpoint or an optimizer
    assert not any(k.startswith("vision_encoder") for k in cli.model.state_dict())
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in cli.model.parameters() if p.requires_grad}


def test_an_empty_batch_takes_no_optimizer_step_and_the_run_goes_on():
    """A batch whose every sample was unreadable: no loss, no step; the next real batch trains."""
    module = small_module()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    empty = {"skipped": {"unreadable_image": 2}}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([empty, fake_batch(2), empty], batch_size=None))
    state = trainer.optimizers[0].state  # AdamW counts the updates each parameter received
    assert state and {int(s["step"]) for s in state.values()} == {1}  # the real batch's update only
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)


def test_ema_tracks_the_trainable_weights_and_is_what_gets_exported(tmp_path: Path):
    module = small_module(ema_decay=0.75)
    params = module.trainable_parameters()
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    module.on_train_batch_end(None, None, 0)
    for shadow, s in zip(module.ema.shadow, start, strict=True):  # 0.75 * old + 0.25 * new
        torch.testing.assert_close(shadow, s + 0.25)
    module.save_detokenizer(tmp_path)
    loaded = load_detokenizer(tmp_path)
    shadow_of = {id(p): shadow for p, shadow in zip(params, module.ema.shadow, strict=True)}
    exported = loaded.adapter.state_dict()
    for name, p in module.adapter.named_parameters():
        torch.testing.assert_close(exported[name], shadow_of[id(p)])
    assert not torch.equal(loaded.adapter.proj_a.weight, module.adapter.proj_a.weight)  # the live weights stay live


# -- what trains -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "kv", "lora", "full"])
def test_trainable_set_follows_train_unet(mode: str):
    module = small_module(train_unet=mode)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    adapter = {f"adapter.{n}" for n, _ in module.adapter.named_parameters()}
    unet = {n for n in trainable if n.startswith("unet.")}
    assert adapter <= trainable and not any(n.startswith("vision_encoder") for n in trainable)
    if mode == "none":
        assert unet == set()
    elif mode == "kv":
        assert unet and all(n.split(".")[-2] in ("to_k", "to_v") for n in unet)
        n_attn = sum(1 for n, _ in module.unet.named_modules() if n.endswith(".to_k"))
        assert len(unet) == 2 * n_attn  # every attention layer, self and cross
    elif mode == "lora":
        assert unet and all("lora_" in n for n in unet)
    else:
        assert unet == {f"unet.{n}" for n, _ in module.unet.named_parameters()}
    optimizer = module.configure_optimizers()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in module.parameters() if p.requires_grad
    )


def test_conditioning_dropout_feeds_zero_image_features():
    module = small_module(cond_dropout=1.0)
    seen: list[torch.Tensor] = []
    module.adapter.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    batch = fake_batch(3)
    module._shared_step(batch, "train")
    null = module.vision_encoder(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(seen[0], null.expand(3, -1, -1))
    seen.clear()
    module._shared_step(batch, "val")  # never dropped outside training
    assert torch.allclose(seen[0], module.vision_encoder(batch["vit_pixels"]))


def test_sampling_uses_cfg_with_zero_image_branch():
    module = small_module()
    seen: list[torch.Tensor] = []
    module.adapter.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    feats = module.vision_encoder(fake_batch(2)["vit_pixels"])
    out = module.decode(feats, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    assert len(seen) == 2 and torch.allclose(seen[1], module.vision_encoder.null_features(2))
    seen.clear()
    module.decode(feats, num_inference_steps=2, guidance_scale=1.0)
    assert len(seen) == 1  # no unconditional branch without guidance


def test_dpm_solver_reaches_the_converged_image_in_fewer_steps_than_euler():
    """The ``dpmpp`` sampler solves the same ODE: nearer its many-step solution than Euler at the
    same step count (a trailing schedule, so every step count starts from the same noise level)."""
    module = small_module(noise=NoiseSpec(prediction_type="epsilon", timestep_spacing="trailing", steps_offset=0)).eval()
    torch.manual_seed(0)
    features = torch.randn(1, module.vision_encoder.num_tokens, module.vision_encoder.dim)

    def draw(sampler: str, steps: int) -> torch.Tensor:
        return module.decode(features, num_inference_steps=steps, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0), sampler=sampler)

    converged = draw("euler", 200)
    error = {(s, n): float((draw(s, n) - converged).abs().mean()) for s in ("euler", "dpmpp") for n in (10, 20)}
    assert error[("dpmpp", 20)] < 0.6 * error[("euler", 20)]  # measured: 0.0046 vs 0.0122
    assert error[("dpmpp", 10)] < 0.6 * error[("euler", 10)]  # measured: 0.012 vs 0.024
    assert error[("dpmpp", 20)] < error[("dpmpp", 10)]  # and it converges


# -- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kv", "lora"])
def test_export_round_trip(tmp_path: Path, mode: str):
    module = small_module(train_unet=mode).eval()
    with torch.no_grad():  # move away from init so the round trip is not trivially true
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    module.save_detokenizer(tmp_path)
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "export.json").is_file()

    batch = fake_batch(2)
    cond = module.conditioning(module.vision_encoder(batch["vit_pixels"]), torch.full((2, 6), 64.0))
    x, t = torch.randn(2, 48, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        expected = module.unet(x, t, **cond.unet_kwargs()).sample
        exported = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
        got = exported(x, t, **cond.unet_kwargs()).sample
    assert torch.allclose(got, expected, atol=1e-5)

    loaded = load_detokenizer(tmp_path).eval()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = module.reconstruct(batch["vit_pixels"], num_inference_steps=2, generator=g())
    b = loaded.reconstruct(batch["vit_pixels"], num_inference_steps=2, generator=g())
    assert torch.allclose(a, b, atol=1e-4)


# -- real scale, no weights ------------------------------------------------------------------


def test_real_config_instantiates_on_meta_device():
    from tools.cli import cli_main

    cli = cli_main(
        [
            *config_command(str(REAL_CONFIG))[1:],
            "--model.init_args.unet.meta_init=true",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
        ],
        run=False,
    )
    module = cli.model
    assert isinstance(module, DetokenizerModule)
    module.configure_model()
    unet = module.unet
    assert all(p.device.type == "meta" for p in unet.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    assert abs(n_unet - SDXL_UNET_PARAMS) / SDXL_UNET_PARAMS < 0.01
    assert unet.config.cross_attention_dim == 2048 and unet.config.projection_class_embeddings_input_dim == 2816
    assert (module.vision_encoder.num_tokens, module.vision_encoder.dim) == (256, 4096)
    # trains the resampler/adapter and to_k/to_v of every UNet attention, nothing else
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    expected = {f"adapter.{n}" for n, _ in module.adapter.named_parameters()} | {
        f"unet.{n}" for n, _ in unet.named_parameters() if n.endswith(("to_k.weight", "to_v.weight"))
    }
    assert trainable == expected
    n_kv = sum(p.numel() for n, p in unet.named_parameters() if n.endswith(("to_k.weight", "to_v.weight")))
    assert n_kv == 545_587_200
    cfg = module.adapter_config.resampler
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.num_queries, cfg.input_dim, cfg.ff_mult) == (1024, 4, 16, 64, 64, 4096, 4)
    assert (module.num_inference_steps, module.guidance_scale) == (50, 7.5)


class RepeatBatch(IterableDataset):
    """The same (already collated) batch, ``times`` times."""

    def __init__(self, batch: dict, times: int):
        self.batch, self.times = batch, times

    def __iter__(self):
        return (self.batch for _ in range(self.times))


# -- learning ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_overfits_a_handful_of_frames(tiny_world: Path, tiny_tower: Path):
    """A few frames: the loss falls clearly and reconstructions beat the mean image on PSNR."""
    from datamodules.storystream import StoryStreamDataModule

    dm = StoryStreamDataModule(
        mode="frames",
        train_files=str(tiny_world / "train.jsonl"),
        image_root=str(tiny_world / "images"),
        vit_image_size=64,
        image_size=64,
        batch_size=4,
        shuffle=True,  # frames of different stories: the mean image is then a fair baseline
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch.pop("skipped", None)
    torch.manual_seed(0)
    # the tiny config's architecture and noise (SD-XL schedule, x0 prediction)
    module = DetokenizerModule(**tiny_detokenizer_args(tiny_tower), train_unet="full", cond_dropout=0.0)
    steps = 200

    def one_cycle():  # the tiny config's schedule: warm up, then anneal to a settled model
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    module.configure_optimizers = one_cycle  # type: ignore[method-assign]
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(RepeatBatch(batch, steps), batch_size=None))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)

    module.eval()
    recon = module.reconstruct(batch["vit_pixels"], num_inference_steps=20, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    target = batch["pixels"]
    baseline = target.mean(dim=0, keepdim=True).expand_as(target)
    assert psnr(recon, target) > psnr(baseline, target) + 2.0
