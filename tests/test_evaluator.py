"""The story evaluator: tokenizer, CLIP view, save/load, CLIPScore compatibility, CLI run, real accuracy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from datamodules import synthetic, synthetic_world
from datamodules.storystream import StoryStreamDataModule
from evaluation.evaluator import clip_score_model, load_evaluator, make_evaluator_tokenizer, save_evaluator
from evaluation.story_metrics import to_uint8
from lightning_modules.evaluator import EvaluatorModule
from tests.conftest import config_command, data_args
from tools.cli import cli_main

SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
             num_heads=2, projection_dim=16)  # fmt: skip


def built_module(world: Path, tmp_path: Path, **kwargs) -> EvaluatorModule:
    module = EvaluatorModule(
        tokenizer_path=str(tmp_path / "tok"), tokenizer_train_file=str(world / "train.jsonl"), **{**SMALL, **kwargs}
    )
    module.prepare_data()
    module.configure_model()
    return module.eval()


def frames(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1.0


def test_tokenizer_closes_every_caption_with_eos_and_pooling_ignores_padding(tiny_world, tmp_path):
    folder = make_evaluator_tokenizer(tiny_world / "train.jsonl", tmp_path / "tok")
    assert (folder / "tokenizer.json").exists()
    module = built_module(tiny_world, tmp_path)
    tok = module.net.tokenizer
    ids = tok(["Bolt waves hello."])["input_ids"][0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    short, long = "Bolt waves hello.", "Pip and Mira meet and say hello. Bolt watches."
    with torch.no_grad():
        batch = module.text_features([short, long])  # `short` is padded here
        alone = module.text_features([short])
    assert torch.allclose(batch[0], alone[0], atol=1e-5)  # pooled at eos, not at the padding
    assert (batch[0] @ batch[1]).item() < 0.999  # and different captions differ


def test_image_features_match_the_saved_clip_processor_pipeline(tiny_world, tmp_path):
    """Our [-1, 1] -> CLIP view equals what CLIPImageProcessor does with the same frames as uint8,
    so tools that only see the saved folder (torchmetrics) score exactly what we score."""
    module = built_module(tiny_world, tmp_path)
    folder = save_evaluator(module.net, tmp_path / "export")
    images = frames(4)
    processor = CLIPProcessor.from_pretrained(str(folder))
    clip = CLIPModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        pixel_values = processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
        theirs = clip.get_image_features(pixel_values=pixel_values).pooler_output
        ours = module.net.image_embeddings(images)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_save_load_round_trip(tiny_world, tmp_path):
    module = built_module(tiny_world, tmp_path)
    with torch.no_grad():  # make the heads say something: bias one character on, one background up
        module.net.character_head.bias[2] = 10.0
        module.net.background_head.bias[5] = 10.0
    folder = save_evaluator(module.net, tmp_path / "export")
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["kind"] == "evaluator" and manifest["config"]["character_names"] == list(synthetic_world.CHARACTER_NAMES)
    loaded = load_evaluator(folder)
    images = frames(3, seed=1)
    with torch.no_grad():
        assert torch.allclose(loaded.image_features(images), module.image_features(images), atol=1e-6)
        assert torch.allclose(
            loaded.text_features(["Rex sits down to rest."]),
            module.text_features(["Rex sits down to rest."]),
            atol=1e-6,
        )
    assert loaded.predict_background(images) == module.predict_background(images) == ["snow"] * 3
    assert all(synthetic_world.CHARACTER_NAMES[2] in s for s in loaded.predict_characters(images))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_torchmetrics_clipscore_loads_the_saved_folder(tiny_world, tmp_path):
    """torchmetrics 1.9 takes a local folder through a loader callable (strings must be hub names,
    and transformers 5's feature outputs need unwrapping); on our images it is 100 * cosine."""
    module = built_module(tiny_world, tmp_path)
    folder = save_evaluator(module.net, tmp_path / "export")
    images = frames(4, seed=2)
    captions = ["Bolt is alone in the meadow.", "Pip waves hello.", "Mira jumps high.", "Zed sits down to rest."]
    metric = CLIPScore(model_name_or_path=clip_score_model(folder))
    score = metric(list(to_uint8(images)), captions)
    with torch.no_grad():
        cos = (module.image_features(images) * module.text_features(captions)).sum(-1)
    assert score.item() == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-2)


def test_fast_dev_run_of_the_tiny_config(tiny_world, tmp_path):
    export = tmp_path / "export"
    cli = cli_main(
        [
            *config_command("configs/tiny/evaluator.yaml"),
            "--data.init_args.train_files", str(tiny_world / "train.jsonl"),
            "--data.init_args.val_files", str(tiny_world / "val.jsonl"),
            "--data.init_args.test_files", str(tiny_world / "test.jsonl"),
            "--data.init_args.image_root", str(tiny_world / "images"),
            "--data.init_args.synthetic", "null",
            "--data.init_args.batch_size", "8",
            "--model.init_args.tokenizer_path", str(tmp_path / "tok"),
            "--model.init_args.export_dir", str(export),
            "--trainer.fast_dev_run", "2",
            "--trainer.default_root_dir", str(tmp_path / "run"),
        ]
    )  # fmt: skip
    # prepare_data trained the tokenizer on the data's train split (the corpus is written once, in the data config)
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text()) == json.loads(
        make_evaluator_tokenizer(tiny_world / "train.jsonl", tmp_path / "tok_direct").joinpath("tokenizer.json").read_text())
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert 0.0 <= float(cli.trainer.callback_metrics["val/char_f1"]) <= 1.0
    loaded = load_evaluator(export)  # on_fit_end exported a loadable evaluator
    images = frames(2, size=32)  # tiny world frames are 32 px; the config's model takes 64 and resizes
    with torch.no_grad():
        assert torch.allclose(loaded.image_features(images), cli.model.image_features(images), atol=1e-5)


def test_the_visual_tokenizer_config_learns_from_text_alone_and_exports_the_tower_stage_1_reads(tiny_world, tmp_path):
    """configs/tiny/visual_tokenizer.yaml: the evaluator's module with the label heads weighted 0 (and
    not scored), the contrastive text naming the place, exported where configs/tiny/vision_encoder.yaml
    reads its tower, which gives the trained tower's tokens."""
    import yaml

    from lightning_modules.components.vision_encoder import FrozenVisionEncoder, VisionEncoderConfig

    export = tmp_path / "export"
    cli = cli_main([
        *config_command("configs/tiny/visual_tokenizer.yaml"),
        f"--data.init_args.train_files={tiny_world / 'train.jsonl'}", f"--data.init_args.val_files={tiny_world / 'val.jsonl'}",
        f"--data.init_args.test_files={tiny_world / 'test.jsonl'}", f"--data.init_args.image_root={tiny_world / 'images'}",
        "--data.init_args.synthetic=null", "--data.init_args.batch_size=8",
        f"--model.init_args.tokenizer_path={tmp_path / 'tok'}", f"--model.init_args.export_dir={export}",
        "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path / 'run'}",
    ])
    net = cli.model.net
    assert cli.model.hparams.character_weight == cli.model.hparams.background_weight == 0.0
    logged = set(cli.trainer.callback_metrics)
    assert "val/retrieval_acc" in logged and not logged & {"val/char_f1", "val/background_acc", "train/loss_characters"}
    # the contrastive text names the frame's place, as a web caption would
    assert cli.model._texts({"captions": ["Pip waves hello."], "background": ["night"]}) == ["Pip waves hello. Under the night sky."]
    # the config exports where the tiny stages read their tower
    encoder = yaml.safe_load(Path("configs/tiny/vision_encoder.yaml").read_text())
    written = yaml.safe_load(Path("configs/tiny/visual_tokenizer.yaml").read_text())["trainer"]["default_root_dir"]
    assert encoder["path"] == f"{written}/export"
    tower = FrozenVisionEncoder(VisionEncoderConfig(**{**encoder, "path": str(export)}))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vision = net.clip.vision_model.eval()
        layers = vision(pixel_values=pixels, output_hidden_states=True)
        hidden = layers.last_hidden_state if encoder.get("select_layer") is None else layers.hidden_states[encoder["select_layer"]]
        want = vision.post_layernorm(hidden[:, 1:])
    torch.testing.assert_close(tower(pixels), want)


# -- does it actually evaluate? -----------------------------------------------------------


@pytest.fixture(scope="module")
def medium_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 stories at 64 px (the evaluator's size): enough train scenes, 24 held-out stories to score on.
    A story keeps its scenery in every frame, so the train split offers one scene per story; with 64
    of them the evaluator learns each story's scenery and cast together instead of the characters."""
    out = tmp_path_factory.mktemp("medium") / "synthetic"
    synthetic.generate(out, stories=120, seed=1, size=(64, 64))
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def chance_levels(world: Path) -> dict[str, float]:
    """Best constant predictors: predict-every-name or the commonest training set (F1, frame
    accuracy), the commonest background (accuracy), measured on the held-out frames."""
    train = [tuple(c) for r in _records(world / "train.jsonl") for c in r["characters"]]
    held = [r for split in ("val", "test") for r in _records(world / f"{split}.jsonl")]
    truth = [set(c) for r in held for c in r["characters"]]
    common = set(Counter(train).most_common(1)[0][0])

    def f1(pred: set[str]) -> float:
        tp = sum(len(pred & t) for t in truth)
        fp = sum(len(pred - t) for t in truth)
        fn = sum(len(t - pred) for t in truth)
        return 2 * tp / max(2 * tp + fp + fn, 1)

    bgs = Counter(r["background"] for r in held for _ in r["characters"])
    return {
        "char_f1": max(f1(set(synthetic_world.CHARACTER_NAMES)), f1(common)),
        "frame_acc": max(sum(t == common for t in truth), max(Counter(map(frozenset, truth)).values())) / len(truth),
        "background_acc": max(bgs.values()) / sum(bgs.values()),
    }


@pytest.mark.slow
def test_evaluator_beats_chance_on_held_out_frames(medium_world, tmp_path):
    L.seed_everything(0)
    module = EvaluatorModule(
        tokenizer_path=str(tmp_path / "tok"),
        tokenizer_train_file=str(medium_world / "train.jsonl"),
        image_size=64, patch_size=8, vision_width=64, vision_layers=2, text_width=48, text_layers=1,
        num_heads=4, projection_dim=48,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01),
        scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=3e-3, total_steps=400, pct_start=0.1),
    )  # fmt: skip
    held_out = [str(medium_world / "val.jsonl"), str(medium_world / "test.jsonl")]
    data = StoryStreamDataModule(
        **data_args(medium_world, mode="frames", batch_size=32, eval_batch_size=120, val_files=held_out, image_size=64, vit_image_size=64)
    )
    trainer = L.Trainer(max_steps=400, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
    trainer.fit(module, data)
    scorer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    scores = {k.removeprefix("val/"): float(v) for k, v in scorer.validate(module, data, verbose=False)[0].items()}
    chance = chance_levels(medium_world)
    print(
        "held-out:",
        {k: round(scores[k], 3) for k in ("char_f1", "frame_acc", "background_acc", "retrieval_acc")},
        "chance:",
        chance,
    )
    assert scores["char_f1"] > chance["char_f1"] + 0.25
    assert scores["frame_acc"] > chance["frame_acc"] + 0.2
    assert scores["background_acc"] > max(chance["background_acc"] + 0.3, 0.9)
    assert scores["retrieval_acc"] > 2 / 120  # far above 1-in-a-batch
