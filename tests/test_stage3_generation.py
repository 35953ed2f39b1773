"""Stage 3 (de-tokenizer adaptation) and story generation, with small exports made here."""

import json

import pytest
import torch

from datamodules.storystream import StoryStreamDataModule
from lightning_modules.components.noise import NoiseSpec
from lightning_modules.components.perceiver import PerceiverConfig
from lightning_modules.components.sdxl_adapter import SDXLAdapterConfig
from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings
from lightning_modules.components.unet import UNetSpec
from lightning_modules.detokenizer import DetokenizerModule
from lightning_modules.detokenizer_adaptation import DetokenizerAdaptationModule
from lightning_modules.mllm_export import save_mllm
from tests.conftest import NO_PROJECTION, config_command, data_args
from tests.test_detokenizer import SMALL_UNET
from tests.test_story_mllm import TINY_ENCODER, _module, tokenizer_dir  # noqa: F401  (fixture)
from tools.cli import cli_main

FAST = GenerationSettings(steps=3, num_inference_steps=2, guidance_scale=1.0, context=ContextPolicy(mode="sink"))


@pytest.fixture(scope="module")
def exports(tokenizer_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    noise = NoiseSpec(prediction_type="sample", timestep_spacing="trailing", steps_offset=0)  # the tiny default
    adapter = SDXLAdapterConfig(resampler=PerceiverConfig(input_dim=64, dim=32, depth=1, heads=2, dim_head=16, num_queries=8,
                                                          output_dim=32), proj_dims=(16, 32), pooled_dim=32, pool_heads=2)
    detok = DetokenizerModule(vision_encoder=TINY_ENCODER, adapter=adapter, unet=UNetSpec(config=SMALL_UNET), train_unet="full",
                              num_inference_steps=2, guidance_scale=1.0, noise=noise)
    detok.configure_model()
    detok.save_detokenizer(root / "stage1")
    save_mllm(_module(tokenizer_dir), root / "stage2")
    return root


def _stories_batch(world, n=2, frames=4):
    dm = StoryStreamDataModule(**data_args(world, batch_size=n, max_images=frames, min_images=frames, image_size=64, shuffle=False))
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _stage3(exports, **kw):
    module = DetokenizerAdaptationModule(str(exports / "stage1"), str(exports / "stage2"), generation=FAST, **kw)
    module.configure_model()
    return module


def test_missing_exports_fail_naming_the_path(exports, tmp_path):
    with pytest.raises(FileNotFoundError, match="mllm_dir"):
        DetokenizerAdaptationModule(str(exports / "stage1"), str(tmp_path / "nothing"))


def test_only_the_detokenizer_trains_and_checkpoints_hold_no_mllm(exports):
    module = _stage3(exports, train_unet="kv")
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("detokenizer.") for n in trainable)
    unet = [n for n in trainable if ".unet." in n]
    assert any("to_k" in n for n in unet) and not any("to_q" in n or "ff." in n for n in unet)
    assert not any("mllm" in k for k in module.state_dict())
    assert all(not p.requires_grad for p in module.mllm.parameters())


def test_generation_steps_seeds_and_branches(tiny_world, exports):
    module = _stage3(exports).eval()
    batch = _stories_batch(tiny_world, n=1, frames=2)
    start, caption = batch["vit_pixels"][0, :1], batch["captions"][0][:1]
    story = module.generate_story(start, caption)
    generated = story.steps[1:]
    assert len(generated) == 3 and all(s.image.shape == (3, 64, 64) for s in generated)
    assert all(isinstance(s.caption, str) for s in generated)
    again = module.generate_story(start, caption)
    assert again.captions == story.captions
    assert all(torch.equal(a.image, b.image) for a, b in zip(story.steps[1:], again.steps[1:]))
    a, b = module.story_generator().branch(start, ["Bolt waves hello.", "Pip jumps high. Zed watches."])
    assert not torch.allclose(a.steps[1].features, b.steps[1].features)
    # visualization mode: captions are given, images drawn
    vis = module.generate_story(start, caption, given_captions=["Bolt jumps high.", "Bolt sits down to rest."])
    assert vis.captions[1:] == ["Bolt jumps high.", "Bolt sits down to rest."]


@pytest.mark.slow
def test_adaptation_loss_falls_and_beats_stage1_on_regressed_features(tiny_world, exports):
    torch.manual_seed(0)
    module = _stage3(exports, train_unet="full", cond_dropout=0.0)
    batch = _stories_batch(tiny_world, n=2, frames=3)
    features, frames = module.regressed_features(batch)
    truth = batch["pixels"][frames[:, 0], frames[:, 1]]

    def psnr():
        with torch.no_grad():
            images = module.detokenizer.decode(features, generator=torch.Generator().manual_seed(0), num_inference_steps=8)
        return float(10 * torch.log10(4.0 / ((images - truth) ** 2).mean()))

    before = psnr()
    optimizer = torch.optim.AdamW(module.detokenizer.trainable_parameters(), lr=1e-3)
    losses = []
    for step in range(100):
        loss = module.detokenizer.denoising_loss(features, truth, batch["original_size"][frames[:, 0], frames[:, 1]],
                                                 batch["crop_top_left"][frames[:, 0], frames[:, 1]],
                                                 batch["target_size"][frames[:, 0], frames[:, 1]],
                                                 generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert psnr() > before + 3


def test_read_own_trains_on_the_features_a_story_with_the_true_captions_regresses(tiny_world, exports):
    """``read_own`` >= frames - 2: each frame's features are what the story generator regresses for it
    when given the true captions from the first frame (dense context, its own features read back)."""
    batch = _stories_batch(tiny_world, n=1, frames=4)
    module = _stage3(exports, read_own=2)
    with torch.no_grad():
        features, frames = module.regressed_features(batch)
        one_step, _ = _stage3(exports).regressed_features(batch)
    assert frames.tolist() == [[0, 1], [0, 2], [0, 3]]
    settings = GenerationSettings(draw_images=False, context=ContextPolicy(mode="dense"))
    captions = batch["captions"][0]
    story = module.story_generator(settings).generate(batch["vit_pixels"][0, :1], captions[:1], captions=captions[1:4])
    generated = torch.stack([step.features for step in story.steps[1:]])
    torch.testing.assert_close(features.float(), generated.float().to(features.device), atol=1e-4, rtol=1e-4)
    # the first target reads only the true start frame; later ones read regressions, not the truth
    torch.testing.assert_close(features[0], one_step[0])
    assert not torch.allclose(features[2], one_step[2], atol=1e-4)


def test_predict_writes_storyboards(tiny_world, exports, tmp_path):
    from evaluation.evaluator import save_evaluator
    from tests.test_story_metrics import random_evaluator

    evaluator = save_evaluator(random_evaluator(), tmp_path / "evaluator")
    cli_main([
        *config_command("configs/tiny/generate.yaml"),
        f"--model.init_args.detokenizer_dir={exports / 'stage1'}", f"--model.init_args.mllm_dir={exports / 'stage2'}",
        f"--model.init_args.output_dir={tmp_path / 'stories'}", "--model.init_args.generation.steps=2",
        "--model.init_args.generation.num_inference_steps=2",
        NO_PROJECTION,
        f"--data.init_args.predict_files={tiny_world / 'val.jsonl'}", f"--data.init_args.image_root={tiny_world / 'images'}",
        f"--data.init_args.test_files={tiny_world / 'test.jsonl'}",
        "--data.init_args.synthetic=null", f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.evaluator_dir={evaluator}",
    ])
    retention = json.loads((tmp_path / "stories" / "retention.json").read_text())
    assert len(retention["cast"]) == len(retention["background"]) == 3 and retention["stories"] == [2, 2, 2]
    assert all(0 <= v <= 1 for v in retention["cast"] + retention["background"])
    folders = sorted(p for p in (tmp_path / "stories").iterdir() if p.is_dir())
    assert len(folders) == 2  # the two val stories
    for folder in folders:
        record = json.loads((folder / "story.json").read_text())
        assert len(record["captions"]) == 3 and record["given"] == [True, False, False]
        assert all((folder / f).is_file() for f in record["frames"])
        html = (folder / "storyboard.html").read_text()
        assert html.count("data:image/png;base64,") == 3 and "timings" in record
        assert len(record["evaluator_labels"]) == 3 and {"characters", "background"} <= set(record["evaluator_labels"][0])
    # the judge: each story read step by step, and judge.json equal to the summary of those readings
    from evaluation.judge import distinct_share, judge_story, summarize

    readings, spans, real_frames = [], [], []
    for folder in folders:
        record = json.loads((folder / "story.json").read_text())
        story = json.loads(next(line for line in (tiny_world / "val.jsonl").read_text().splitlines()
                                if str(json.loads(line)["id"]) == record["story_id"]))
        truth = record["truth"]  # the start frame's true cast (of the chunk predict started from) and background
        assert truth["start_characters"] in story["characters"] and truth["background"] == story["background"]
        expected = judge_story(record["captions"], record["evaluator_labels"], truth["start_characters"], truth["background"])
        assert record["judge"] == expected
        readings.append(expected)
        spans.append(story["captions"][truth["start_frame"]: truth["start_frame"] + len(record["captions"])])
        real_frames.append((story, range(truth["start_frame"], min(truth["start_frame"] + len(record["captions"]), len(story["images"])))))
    # each story sampled with its own seed, derived from the configured one and its id
    from lightning_modules.story_generation import story_seed

    seeds = [json.loads((folder / "story.json").read_text())["settings"]["seed"] for folder in folders]
    ids = [json.loads((folder / "story.json").read_text())["story_id"] for folder in folders]
    assert seeds == [story_seed(0, i) for i in ids] and len(set(seeds)) == 2
    assert story_seed(0, ids[0]) == story_seed(0, ids[0]) != story_seed(1, ids[0])
    judge = json.loads((tmp_path / "stories" / "judge.json").read_text())
    assert judge.pop("real_distinct_consecutive") == pytest.approx(distinct_share(spans))  # the true stories, same frames
    # and the true frames of those spans, read by the same evaluator, judged the same way
    from evaluation.evaluator import load_evaluator

    dm = StoryStreamDataModule(**data_args(tiny_world, image_size=64, predict_files=str(tiny_world / "val.jsonl")))
    dm.setup("predict")
    dataset = dm.datasets["predict"]
    net = load_evaluator(evaluator)
    real_readings = []
    for story, span in real_frames:
        frames = dataset.load_frames([s.story_id for s in dataset.stories].index(str(story["id"])), span)
        characters, backgrounds = net.predict_labels(frames["pixels"])
        labels = [{"characters": sorted(c), "background": b} for c, b in zip(characters, backgrounds)]
        real_readings.append(judge_story([story["captions"][f] for f in span], labels, story["characters"][span[0]], story["background"]))
    assert judge.pop("real_coherence_f1") == pytest.approx(summarize(real_readings)["coherence_f1"])
    assert {k: v for k, v in judge.items() if k not in ("detokenizer_dir", "mllm_dir")} == json.loads(json.dumps(summarize(readings)))


def test_min_new_tokens_holds_back_the_stop_tokens():
    from lightning_modules.components.caption_decoding import DecodeSettings, pick_token

    logits = torch.tensor([0.0, 5.0, 1.0, 2.0])
    assert pick_token(logits, DecodeSettings()) == 1
    assert pick_token(logits, DecodeSettings(), banned=(1,)) == 3
    sampled = {pick_token(logits, DecodeSettings(temperature=1.0), torch.Generator().manual_seed(s), banned=(1, 3)) for s in range(20)}
    assert sampled <= {0, 2}


def test_every_caption_has_min_new_tokens(tiny_world, exports):
    import dataclasses

    from lightning_modules.components.caption_decoding import DecodeSettings

    module = _stage3(exports).eval()
    tokens = module.mllm.story_format.tokens
    batch = _stories_batch(tiny_world, n=1, frames=2)
    settings = dataclasses.replace(FAST, draw_images=False, context=ContextPolicy(mode="dense"),
                                   decode=DecodeSettings(max_new_tokens=6, min_new_tokens=6))
    story = module.story_generator(settings).generate(batch["vit_pixels"][0, :1], batch["captions"][0][:1])
    cached = [s.cached_tokens for s in story.steps[1:]]
    per_step = len(tokens.separator) + 6 + 1 + len(tokens.slots) + 1  # sep, caption, <img>, slots, </img>
    assert [b - a for a, b in zip(cached, cached[1:])] == [per_step] * (len(cached) - 1)


def test_offloaded_generation_is_the_same_story_with_one_network_on_the_device(tiny_world, exports, monkeypatch):
    """``offload``: the story is written, then drawn, with only the working network on the execution
    device. Here the device moves are recorded (CPU only), and the story must equal the plain path's."""
    import dataclasses

    from lightning_modules.components import placement
    from lightning_modules.components.story_generator import StoryGenerator

    module = _stage3(exports).eval()
    batch = _stories_batch(tiny_world, n=1, frames=2)
    start, caption = batch["vit_pixels"][0, :1], batch["captions"][0][:1]
    plain = module.story_generator().generate(start, caption)
    plain_reread = module.story_generator(dataclasses.replace(FAST, reencode_images=True)).generate(start, caption)

    where: dict[int, str] = {}  # the recorded place of each network ("cpu" until moved)
    monkeypatch.setattr(placement, "_device_of", lambda m: torch.device(where.get(id(m), "cpu")))
    monkeypatch.setattr(placement, "_move", lambda m, device: where.__setitem__(id(m), device.type))
    mllm, detok = module.mllm, module.detokenizer
    working = []

    def check(name, other, fn):
        def wrapped(*args, **kwargs):
            assert where.get(id(other), "cpu") == "cpu", f"{name} works while the other network is on the device"
            assert where.get(id({"mllm": mllm, "detokenizer": detok}[name])) == "cuda"
            working.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(detok, "decode", check("detokenizer", mllm, detok.decode))
    monkeypatch.setattr(mllm.base_llm.model, "forward", check("mllm", detok, mllm.base_llm.model.forward))
    generator = StoryGenerator(mllm, detok, dataclasses.replace(FAST, offload=True), device="cuda")
    offloaded = generator.generate(start, caption)
    assert offloaded.captions == plain.captions
    for a, b in zip(plain.steps[1:], offloaded.steps[1:]):
        torch.testing.assert_close(a.features, b.features, atol=0, rtol=0)
        torch.testing.assert_close(a.image, b.image, atol=0, rtol=0)
    # written whole, then drawn: each network moved to the device once
    assert working.index("detokenizer") > max(i for i, n in enumerate(working) if n == "mllm")
    assert generator.placement.moves == [("mllm", "device"), ("mllm", "cpu"), ("detokenizer", "device")]
    # drawn images fed back (reencode_images): the two take turns every step, still the same story
    turns = StoryGenerator(mllm, detok, dataclasses.replace(FAST, offload=True, reencode_images=True), device="cuda")
    reread = turns.generate(start, caption)
    assert reread.captions == plain_reread.captions
    torch.testing.assert_close(reread.steps[-1].image, plain_reread.steps[-1].image, atol=0, rtol=0)
    assert sum(1 for name, to in turns.placement.moves if name == "detokenizer" and to == "device") == 3  # one per step


def test_every_attention_of_a_story_runs_through_sdpa(tiny_world, exports, monkeypatch):
    """LLM, ViT, resamplers, adapter and UNet attend with ``F.scaled_dot_product_attention``
    (fused kernels on a GPU): no attention matrix is softmaxed by hand while a story is generated."""
    import torch.nn.functional as F

    module = _stage3(exports).eval()
    batch = _stories_batch(tiny_world, n=1, frames=2)
    calls = {"sdpa": 0}
    sdpa = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def no_softmax(*args, **kwargs):
        raise AssertionError("an attention computed its softmax outside SDPA")

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    monkeypatch.setattr(torch, "softmax", no_softmax)
    monkeypatch.setattr(F, "softmax", no_softmax)
    monkeypatch.setattr(torch.Tensor, "softmax", no_softmax)
    story = module.generate_story(batch["vit_pixels"][0, :1], batch["captions"][0][:1])
    assert len(story.steps) == 4 and calls["sdpa"] > 0
    assert module.mllm.base_llm.config._attn_implementation == "sdpa"



def test_a_bf16_model_generates_what_the_fp32_model_does(tiny_world, exports):
    """Weights in bf16 (``precision: bf16-true``, the one-GPU setting): every network is fed its own
    dtype, and the regressed features follow the fp32 model's (visualization mode: same captions)."""
    module = _stage3(exports).eval()
    batch = _stories_batch(tiny_world, n=1, frames=4)
    start, captions = batch["vit_pixels"][0, :1], batch["captions"][0]
    full = module.generate_story(start, captions[:1], given_captions=captions[1:])
    module.to(torch.bfloat16)  # the Lightning precision plugin's conversion; the frozen MLLM follows
    assert module.mllm.dtype == torch.bfloat16 == next(module.mllm.parameters()).dtype
    half = module.generate_story(start.bfloat16(), captions[:1], given_captions=captions[1:])
    for a, b in zip(full.steps[1:], half.steps[1:]):
        assert b.features.dtype == torch.float32 and torch.isfinite(b.image).all()
        assert torch.nn.functional.cosine_similarity(a.features.flatten(), b.features.flatten(), dim=0) > 0.99


def test_offloaded_parts_wait_on_the_cpu_and_take_the_modules_precision(tiny_world, exports):
    from lightning_modules.story_generation import StoryGenerationModule

    generation = GenerationSettings(steps=1, num_inference_steps=1, guidance_scale=1.0, offload=True)
    module = StoryGenerationModule(str(exports / "stage1"), str(exports / "stage2"), generation=generation)
    module.configure_model()
    module.to(torch.bfloat16)  # what bf16-true does; a move to a GPU would leave the parts on the CPU as well
    batch = _stories_batch(tiny_world, n=1, frames=2)
    story = module.generate_story(batch["vit_pixels"][0, :1].bfloat16(), batch["captions"][0][:1])
    assert module.mllm.dtype == module.detokenizer.dtype == torch.bfloat16 and torch.isfinite(story.steps[1].image).all()


def test_generation_never_builds_the_detokenizers_vit(tiny_world, exports):
    """The unconditional branch reads the zero image's features from the export, so drawing with CFG
    needs no second ViT (at real scale, 1.9 B parameters the MLLM already holds)."""
    import dataclasses

    from lightning_modules.components.vision_encoder import FrozenVisionEncoder
    from lightning_modules.detokenizer import load_detokenizer

    detokenizer = load_detokenizer(exports / "stage1")
    module = _stage3(exports).eval()
    batch = _stories_batch(tiny_world, n=1, frames=2)
    settings = dataclasses.replace(FAST, steps=1, guidance_scale=2.0)
    module.detokenizer = detokenizer  # as loaded for generation
    module.generate_story(batch["vit_pixels"][0, :1], batch["captions"][0][:1], settings=settings)
    assert detokenizer.vision_encoder.frozen_tower is None
    fresh = FrozenVisionEncoder(detokenizer.vision_config)  # the same tower, computing them again
    torch.testing.assert_close(detokenizer.vision_encoder.null_features(1), fresh.null_features(1), atol=1e-6, rtol=0)


def test_teacher_forced_features_are_each_frames_regression_from_the_true_frames_before_it(tiny_world, exports, tokenizer_dir,  # noqa: F811
                                                                                           tmp_path):
    """``tools.evaluate_stories --source regressed``: frame k is regressed from true frames 0..k-1 and their
    captions; one pass of ``supervise: all`` over the whole chunk computes the same (its block mask)."""
    from evaluation.evaluator import save_evaluator
    from tests.test_story_metrics import random_evaluator
    from tools.evaluate_stories import reference_scores, teacher_forced_features

    mllm = _module(tokenizer_dir, supervise="all").eval()
    batch = _stories_batch(tiny_world, n=1, frames=4)
    frames = {"vit_pixels": batch["vit_pixels"][0], "captions": batch["captions"][0]}
    with torch.no_grad():
        one_pass = mllm.forward_story(batch).predicted_features
        per_frame = teacher_forced_features(mllm, frames)
    assert per_frame.shape == one_pass.shape == (3, *one_pass.shape[1:])
    torch.testing.assert_close(per_frame, one_pass, atol=1e-5, rtol=1e-5)

    evaluator = save_evaluator(random_evaluator(), tmp_path / "evaluator")
    scores = reference_scores(str(evaluator), tiny_world, "test", "regressed", steps=2,
                              detokenizer_dir=str(exports / "stage1"), num_inference_steps=2, mllm_dir=str(exports / "stage2"))
    assert 0.0 <= scores["character_f1"] <= 1.0 and scores["fid_evaluator"] >= 0.0


def test_evaluate_stories_copy_draws_each_frame_from_the_true_frame_before_it(tiny_world, exports, tmp_path, monkeypatch):  # noqa: F811
    """``--source copy`` scores frames 1..k against the de-tokenizer's drawing of frames 0..k-1's true features."""
    from datamodules.storystream import StoryStreamDataModule
    from evaluation.evaluator import save_evaluator
    from evaluation.story_metrics import StoryMetrics
    from lightning_modules.detokenizer import load_detokenizer
    from tests.test_story_metrics import random_evaluator
    from tools.evaluate_stories import reference_scores

    scored = []
    update = StoryMetrics.update
    monkeypatch.setattr(StoryMetrics, "update", lambda self, drawn, truth, *rest: (scored.append((drawn, truth)), update(self, drawn, truth, *rest))[1])
    evaluator = save_evaluator(random_evaluator(), tmp_path / "evaluator")
    reference_scores(str(evaluator), tiny_world, "test", "copy", steps=2, detokenizer_dir=str(exports / "stage1"),
                     num_inference_steps=2, stories=1)

    detokenizer = load_detokenizer(str(exports / "stage1")).eval()
    dm = StoryStreamDataModule(test_files=str(tiny_world / "test.jsonl"), image_root=str(tiny_world / "images"),
                               vit_image_size=detokenizer.vision_encoder.image_size, image_size=64)
    dm.setup("test")
    story = dm.datasets["test"]
    with torch.no_grad():
        expected = detokenizer.reconstruct(story.load_frames(0, range(0, 2))["vit_pixels"], generator=torch.Generator().manual_seed(0),
                                           num_inference_steps=2)
    (drawn, truth), = scored
    torch.testing.assert_close(drawn, expected)
    torch.testing.assert_close(truth, story.load_frames(0, range(1, 3))["pixels"])


def test_evaluate_stories_sheet_shows_each_storys_true_frames_above_the_frames_scored(tiny_world, tmp_path):  # noqa: F811
    """``--sheet``: with ``--source real`` the frames scored are the true ones, so each story's two rows match."""
    import numpy as np
    from PIL import Image

    from evaluation.evaluator import save_evaluator
    from tests.test_story_metrics import random_evaluator
    from tools.evaluate_stories import reference_scores

    evaluator = save_evaluator(random_evaluator(), tmp_path / "evaluator")
    sheet = tmp_path / "sheet.png"
    reference_scores(str(evaluator), tiny_world, "test", "real", steps=3, sheet=sheet, sheet_stories=2)
    grid = np.asarray(Image.open(sheet).convert("RGB"))
    cell = 64 + 1  # frame and padding
    assert grid.shape == (4 * cell + 1, 3 * cell + 1, 3)
    rows = [grid[1 + r * cell: r * cell + cell] for r in range(4)]
    assert np.array_equal(rows[0], rows[1]) and np.array_equal(rows[2], rows[3])
    assert not np.array_equal(rows[0], rows[2])  # two different stories

    reference_scores(str(evaluator), tiny_world, "test", "real", steps=3, sheet=sheet, sheet_stories=2, stories=1)
    assert np.asarray(Image.open(sheet)).shape[0] == 2 * cell + 1  # only the first story was scored
