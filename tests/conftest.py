"""Shared fixtures: small synthetic worlds made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from datamodules import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 stories of 30 frames at 32x32: 16 train, 2 val, 2 test."""
    out = tmp_path_factory.mktemp("world") / "synthetic"
    synthetic.generate(out, stories=20, seed=0, size=(32, 32))
    return out


@pytest.fixture(scope="session")
def tiny_tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the quickstart's visual tokenizer (``runs/tiny_tokenizer/export``, which
    configs/tiny/vision_encoder.yaml reads): a seeded random CLIP vision tower folder at its sizes."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out = tmp_path_factory.mktemp("tiny_tower")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=256)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llm(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the quickstart's pretrained LLM (``runs/tiny_llm/export/llm``, which
    configs/tiny/stage2_mllm.yaml reads): the tiny language-model config's Llama, seeded and
    untrained, exported with a tokenizer trained on ``tiny_world``'s captions."""
    from lightning_modules.components.story_llm import LLMSpec
    from lightning_modules.language_model import export_untrained

    spec = LLMSpec(**tiny_init_args("configs/tiny/language_model.yaml")["llm"])
    return export_untrained(spec, [str(tiny_world / "train.jsonl")], tmp_path_factory.mktemp("tiny_llm"))


def llm_args(folder: Path) -> list[str]:
    """The command-line overrides that point the tiny stage-2 config at an LLM folder (see :func:`tiny_llm`)."""
    return [f"--model.init_args.llm.path={folder}", f"--model.init_args.story_format.tokenizer={folder}"]


def tower_args(tower: Path) -> list[str]:
    """The command-line override that points a tiny stage config at a tower folder."""
    return [f"--model.init_args.vision_encoder.path={tower}"]


def data_args(world: Path, **overrides) -> dict:
    """StoryStreamDataModule kwargs for a synthetic world folder."""
    args = dict(
        train_files=str(world / "train.jsonl"),
        val_files=str(world / "val.jsonl"),
        test_files=str(world / "test.jsonl"),
        image_root=str(world / "images"),
        vit_image_size=32,
        image_size=32,
        batch_size=4,
    )
    args.update(overrides)
    return args


def config_command(path: str) -> list[str]:
    """The subcommand and ``--config`` arguments of a config's first line (its whole command,
    overlays included), e.g. ``["fit", "--config", "configs/tiny/data.yaml", ..., "--config", path]``:
    tests run a config exactly as its users do, then add their overrides."""
    from tools.cli import config_command as command

    return command(path)


# the tiny generate / stage-3 configs project regressed features through the tower's final norm;
# the test exports' random tower is read without it, so tests that run those configs turn it off
NO_PROJECTION = "--model.init_args.generation.project_features=false"


def config_files(path: str) -> list[str]:
    """The config files a config's command composes, in order (for ``tools.consolidate``)."""
    return config_command(path)[2::2]


def tiny_init_args(config: str) -> dict:
    """The model ``init_args`` of a tiny config as written: tests shrink the real tiny architecture
    instead of keeping constants of their own."""
    import yaml

    return yaml.safe_load(Path(config).read_text())["model"]["init_args"]


def tiny_detokenizer_args(tower: Path) -> dict:
    """The tiny stage-1 config's de-tokenizer, as ``DetokenizerModule`` arguments (encoder, adapter, UNet, noise),
    reading the visual tokenizer from ``tower`` (see :func:`tiny_tower`)."""
    import yaml

    from lightning_modules.components.noise import NoiseSpec
    from lightning_modules.components.sdxl_adapter import adapter_config_from_dict
    from lightning_modules.components.unet import UNetSpec
    from lightning_modules.components.vision_encoder import VisionEncoderConfig

    args = tiny_init_args("configs/tiny/stage1_detokenizer.yaml")
    vision = yaml.safe_load(Path("configs/tiny").joinpath(args["vision_encoder"]).read_text())
    return dict(vision_encoder=VisionEncoderConfig(**{**vision, "path": str(tower)}), adapter=adapter_config_from_dict(args["adapter"]),
                unet=UNetSpec(config=args["unet"]["config"]), noise=NoiseSpec(**args["noise"]),
                pixel_patch=args["pixel_patch"], position_channels=args["position_channels"])


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run wherever CUDA is present and are skipped, with the reason, everywhere else."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
