"""Stage 2: the story-teller MLLM."""

from types import SimpleNamespace

import pytest
import torch

from datamodules.sequence import IGNORE_INDEX
from datamodules.story_format import StoryFormatConfig
from datamodules.storystream import StoryStreamDataModule
from datamodules.tokenizer import make_tiny_tokenizer
from lightning_modules.components.perceiver import PerceiverConfig
from lightning_modules.components.story_llm import LLMSpec, LoRASpec
from lightning_modules.components.vision_encoder import VisionEncoderConfig
from lightning_modules.mllm_export import load_mllm, save_mllm
from lightning_modules.story_mllm import StoryMLLMModule
from tests.conftest import config_command, data_args, llm_args, tiny_init_args, tower_args
from tools.cli import cli_main

TINY_ENCODER = VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
# the tiny config's Llama, shrunk further
SMALL_LLAMA = dict(tiny_init_args("configs/tiny/language_model.yaml")["llm"]["config"], hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
CPU_TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
SMALL_RESAMPLER = PerceiverConfig(dim=64, depth=1, heads=2, dim_head=32, ff_mult=2)


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_world, tmp_path_factory):
    return make_tiny_tokenizer(tiny_world / "train.jsonl", tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=300)


def _module(tokenizer_dir, supervise="last", **kw) -> StoryMLLMModule:
    story_format = StoryFormatConfig(tokenizer=str(tokenizer_dir), num_queries=4, supervise=supervise, max_length=512)
    args = dict(llm=LLMSpec(config=SMALL_LLAMA), story_format=story_format, vision_encoder=TINY_ENCODER,
                input_resampler=SMALL_RESAMPLER, output_resampler=SMALL_RESAMPLER)
    args.update(kw)
    module = StoryMLLMModule(**args)
    module.configure_model()
    return module


def _train(module: StoryMLLMModule, batch, steps: int, lr: float = 3e-3) -> list[dict[str, float]]:
    """``steps`` AdamW steps on one batch; every step's loss terms."""
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=lr)
    history = []
    for _ in range(steps):
        terms = module.losses(module.forward_story(batch))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append({k: float(v) for k, v in terms.items()})
    return history


def _assert_training_reads_changed_frames_and_keeps_targets(module: StoryMLLMModule, batch) -> None:
    """A training-only augmentation of what the model reads: in training the edited frames differ from
    evaluation's, the targets are the same true features."""
    module.train()
    out = module.forward_story(batch)
    with torch.no_grad():
        module.eval()
        clean = module.forward_story(batch)
    torch.testing.assert_close(out.target_features, clean.target_features)
    assert not torch.allclose(out.previous_features, clean.previous_features)


def _batch(world, n=4, max_images=4, seed=0):
    dm = StoryStreamDataModule(**data_args(world, batch_size=n, max_images=max_images, min_images=max_images, seed=seed, shuffle=False))
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_real_config_instantiates_on_meta():
    cli = cli_main([*config_command("configs/seed_story/stage2_mllm.yaml")[1:], "--model.init_args.llm.meta_init=true", *CPU_TRAINER],
                   run=False)
    module = cli.model
    module.configure_model()
    base = module.base_llm
    assert base.get_input_embeddings().weight.shape[0] == 32000 + 66
    names = dict(module.llm.named_parameters())
    original = sum(p.numel() for n, p in names.items() if "lora_" not in n and "modules_to_save" not in n)
    original -= 66 * 4096 * 2  # the new token rows of embeddings and head
    assert abs(original - 6.74e9) / 6.74e9 < 0.01
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n or "modules_to_save" in n or "resampler" in n) for n in trainable)
    for kind in ("lora_A", "embed_tokens", "lm_head", "input_layernorm", "model.norm", "input_resampler", "output_resampler"):
        assert any(kind in n for n in trainable), kind
    assert not any("q_proj.base_layer" in n for n in trainable)
    # SEED-Story's resamplers: one attention at 4096 with 32 heads; 64 input slots, 256 output tokens
    released = {"query", "pos_embed", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias"}
    for resampler, queries in ((module.input_resampler, 64), (module.output_resampler, 256)):
        assert set(resampler.state_dict()) == released and resampler.attn.num_heads == 32
        assert resampler.query.shape == resampler.pos_embed.shape == (queries, 4096)
        assert resampler.attn.in_proj_weight.shape == (3 * 4096, 4096)


def test_vocabulary_grows_with_mean_initialised_story_tokens(tokenizer_dir):
    module = _module(tokenizer_dir)
    emb = module.base_llm.get_input_embeddings().weight
    old = module.base_vocab_size
    assert emb.shape[0] == len(module.story_format.tokenizer) == old + 4 + 2
    assert torch.allclose(emb[old:], emb[:old].mean(0).expand(6, -1))


@pytest.mark.slow
def test_overfit_a_few_stories(tiny_world, tokenizer_dir):
    torch.manual_seed(0)
    module = _module(tokenizer_dir, supervise="all")
    batch = _batch(tiny_world)
    history = _train(module, batch, steps=150)
    first, last = history[0], history[-1]
    assert last["lm_loss"] < 0.2 * first["lm_loss"]
    assert last["rec_loss"] < 0.5 * first["rec_loss"]
    # teacher-forced next caption (last mode, the SEED-Story task) is exact for every story
    module.story_format = module.story_format.replace(supervise="last")
    with torch.no_grad():
        out = module.forward_story(batch)
    predicted, labels = out.logits[:, :-1].argmax(-1), out.sequence.labels[:, 1:]
    for row in range(labels.shape[0]):
        keep = labels[row] != IGNORE_INDEX
        assert torch.equal(predicted[row][keep], labels[row][keep])


def test_saved_lora_adapter_loads_with_peft_and_gives_the_same_logits(tiny_world, tokenizer_dir, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    module = _module(tokenizer_dir, lora=LoRASpec(r=4, alpha=8, dropout=0.0))
    batch = _batch(tiny_world, n=2)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        loss = module.losses(module.forward_story(batch))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    save_mllm(module, tmp_path / "export")
    ids = torch.randint(0, len(module.story_format.tokenizer), (2, 12))
    with torch.no_grad():
        expected = module.llm(input_ids=ids).logits
        fresh = _module(tokenizer_dir)  # same seeded base, vocabulary grown, no LoRA
        peft_model = PeftModel.from_pretrained(fresh.llm, str(tmp_path / "export" / "llm_adapter")).eval()
        assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-5)
        reloaded = load_mllm(tmp_path / "export")
        a, b = module.forward_story(batch), reloaded.forward_story(batch)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.predicted_features, b.predicted_features, atol=1e-5)


# the tiny config's keep-or-code, its codes fitted on the train split at the start of fit (fewer: the test world is small)
SMALL_CODEBOOK = ["--model.init_args.codebook.size=64", "--model.init_args.codebook.fit_tokens=5000"]
REGRESSION = ["--model.init_args.codebook=null"]  # the same config regressing the features instead


@pytest.mark.parametrize("overrides", [SMALL_CODEBOOK, REGRESSION], ids=["tiny_config", "regression"])
def test_fit_through_train_py_exports_what_reloads(tiny_world, tiny_tower, tiny_llm, tmp_path, overrides):
    """Stage 2 starts from the pretrained LLM folder (model and tokenizer), batches arrive laid out,
    and the export rebuilds a module with the same teacher-forced outputs."""
    cli = cli_main([
        *config_command("configs/tiny/stage2_mllm.yaml"), *tower_args(tiny_tower), *llm_args(tiny_llm), "--trainer.fast_dev_run=2",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.train_files={tiny_world / 'train.jsonl'}", f"--data.init_args.val_files={tiny_world / 'val.jsonl'}",
        f"--data.init_args.test_files={tiny_world / 'test.jsonl'}", f"--data.init_args.image_root={tiny_world / 'images'}",
        "--data.init_args.synthetic=null",
        f"--model.init_args.export_dir={tmp_path / 'export'}",
        *overrides,
    ])
    assert cli.datamodule.story_format is cli.model.story_format  # linked, not configured twice
    if overrides is SMALL_CODEBOOK:  # fitted at the start of fit: 64 distinct codes
        assert bool(cli.model.codebook.fitted) and len(torch.unique(cli.model.codebook.codes, dim=0)) == 64
    batch = next(iter(cli.datamodule.val_dataloader()))
    assert batch["sequence"].input_ids.shape[0] == len(batch["captions"])  # laid out in the loader
    reloaded = load_mllm(tmp_path / "export")
    module = cli.model.eval()
    with torch.no_grad():
        a, b = module.forward_story(batch), reloaded.forward_story(batch)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.predicted_features, b.predicted_features, atol=1e-5, rtol=0)


def test_residual_regression_starts_from_the_previous_frame(tiny_world, tokenizer_dir):  # noqa: F811
    module = _module(tokenizer_dir, residual_features=True)
    torch.nn.init.zeros_(module.output_resampler.proj_out.weight)
    torch.nn.init.zeros_(module.output_resampler.proj_out.bias)
    with torch.no_grad():
        out = module.forward_story(_batch(tiny_world, n=2, max_images=3))
    assert torch.allclose(out.predicted_features, out.previous_features)
    assert not torch.allclose(out.previous_features, out.target_features)


@pytest.mark.parametrize("edit_from", ["previous", "start"])
def test_edit_from_names_the_frame_every_regression_edits_in_training_and_in_a_story(tiny_world, tokenizer_dir, tmp_path,  # noqa: F811
                                                                                      edit_from):
    """With the output resampler reduced to a constant change c, each regressed frame is the edited frame + c:
    in a story, ``previous`` compounds (the start + t c at step t) and ``start`` does not (the start + c)."""
    from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings, StoryGenerator

    module = load_mllm(save_mllm(_module(tokenizer_dir, supervise="all", residual_features=True, queries_from_previous=True,
                                         edit_from=edit_from), tmp_path / "export"))
    assert module.edit_from == edit_from
    torch.nn.init.zeros_(module.output_resampler.proj_out.weight)
    torch.nn.init.constant_(module.output_resampler.proj_out.bias, 0.25)
    batch = _batch(tiny_world, n=2, max_images=4)
    with torch.no_grad():
        out = module.forward_story(batch)
        features, index = module.story_features(batch)
        story = StoryGenerator(module, None, GenerationSettings(draw_images=False, context=ContextPolicy(mode="dense")))
        frames = [step.features for step in story.generate(batch["vit_pixels"][0, :1], batch["captions"][0][:1],
                                                           captions=batch["captions"][0][1:4]).steps]
    edited = index[out.sequence.target_frames[:, 0], out.sequence.target_frames[:, 1] - 1 if edit_from == "previous" else 0]
    torch.testing.assert_close(out.predicted_features, features[edited] + 0.25)
    for t in (1, 2, 3):
        torch.testing.assert_close(frames[t], frames[0] + 0.25 * (t if edit_from == "previous" else 1))


def test_edit_from_start_needs_an_edit():
    with pytest.raises(ValueError, match="edit_from is 'previous', or 'start' with residual_features"):
        StoryMLLMModule(llm=LLMSpec(config=SMALL_LLAMA), edit_from="start")


def test_queries_from_previous_survive_export_and_see_the_previous_frame(tiny_world, tokenizer_dir, tmp_path):  # noqa: F811
    module = _module(tokenizer_dir, residual_features=True, queries_from_previous=True, rec_loss="mse").eval()
    batch = _batch(tiny_world, n=2, max_images=3)
    with torch.no_grad():
        out = module.forward_story(batch)
        hidden = torch.randn(1, 4, 64)
        prev = out.previous_features[:1]
        # the regression depends on the previous frame through the queries, not only the residual
        assert not torch.allclose(module.regress(hidden, prev) - prev, module.regress(hidden, prev + 1) - prev - 1)
    terms = module.losses(out)
    copy = torch.nn.functional.mse_loss(out.previous_features, out.target_features)
    assert float(terms["rec_loss_copy"]) == pytest.approx(float(copy))
    reloaded = load_mllm(save_mllm(module, tmp_path / "export"))
    assert reloaded.queries_from_previous
    with torch.no_grad():
        torch.testing.assert_close(reloaded.regress(hidden, prev), module.regress(hidden, prev))


def test_regress_from_step_reads_its_own_caption_survives_export_and_needs_the_perceiver(tiny_world, tokenizer_dir, tmp_path):  # noqa: F811
    from lightning_modules.components.qwen_resampler import QwenResamplerConfig

    module = _module(tokenizer_dir, supervise="all", residual_features=True, queries_from_previous=True,
                     regress_from="step").eval()
    batch = {k: v for k, v in _batch(tiny_world, n=1, max_images=3).items() if k != "sequence"}  # laid out again below
    captions = batch["captions"][0]
    other = "Zed and Nox meet and say hello." if captions[-1] != "Zed and Nox meet and say hello." else "Zed waves hello."
    with torch.no_grad():
        out = module.forward_story(batch)
        changed = module.forward_story({**batch, "captions": [[*captions[:-1], other]]})
    # the last frame's regression reads its new caption; the frame before it cannot see that caption
    assert not torch.allclose(out.predicted_features[-1], changed.predicted_features[-1])
    torch.testing.assert_close(out.predicted_features[:-1], changed.predicted_features[:-1])
    reloaded = load_mllm(save_mllm(module, tmp_path / "export"))
    assert reloaded.regress_from == "step"
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward_story(batch).predicted_features, out.predicted_features)
    with pytest.raises(ValueError, match="perceiver"):
        _module(tokenizer_dir, output_resampler=QwenResamplerConfig(heads=2), regress_from="step")


def test_context_blur_pulls_read_frames_toward_their_story_mean_and_keeps_targets(tiny_world, tokenizer_dir):  # noqa: F811
    from lightning_modules.components.context_blur import blur_toward_story_mean

    batch = _batch(tiny_world, n=2, max_images=3)
    module = _module(tokenizer_dir, residual_features=True, context_blur=0.5)
    features, index = module.story_features(batch)
    blurred = blur_toward_story_mean(features, index, batch["story_id"], batch["frame_index"], 0.5, seed=3)
    for b in range(2):
        rows = index[b][index[b] >= 0]
        mean = features[rows].mean(0)
        for row in rows:  # on the segment from the frame to its story's mean, at most half way
            share = ((features[row] - blurred[row]).norm() / (features[row] - mean).norm()).item()
            assert 0 <= share <= 0.5 + 1e-5
            torch.testing.assert_close(blurred[row], features[row] + share * (mean - features[row]), atol=1e-4, rtol=0)
    # keyed by (seed, story, frame): the same shares for a sample wherever it sits in a batch
    single = {k: (v[1:] if k not in ("skipped",) and hasattr(v, "__len__") and len(v) == 2 else v) for k, v in batch.items()}
    f1, i1 = module.story_features(single)
    alone = blur_toward_story_mean(f1, i1, single["story_id"], single["frame_index"], 0.5, seed=3)
    torch.testing.assert_close(alone, blurred[index[1][index[1] >= 0]])
    # training reads blurred frames, but the targets are the true ones
    _assert_training_reads_changed_frames_and_keeps_targets(module, batch)


def test_context_swap_takes_rectangles_from_the_same_story_and_keeps_targets(tiny_world, tokenizer_dir):  # noqa: F811
    from lightning_modules.components.context_swap import swap_regions_within_story

    batch = _batch(tiny_world, n=2, max_images=4)
    module = _module(tokenizer_dir, supervise="all", queries_from_previous=True, context_swap=1.0)
    features, index = module.story_features(batch)
    side = int(features.shape[1] ** 0.5)
    swapped = swap_regions_within_story(features, index, batch["story_id"], batch["frame_index"], 1.0, seed=1, step=5)
    changed_frames = 0
    for b in range(2):
        rows = index[b][index[b] >= 0]
        for row in rows:
            changed = (swapped[row] != features[row]).any(-1).view(side, side)
            if not changed.any():
                continue
            changed_frames += 1
            # each changed token is the token at its place in another frame of its own story chunk
            others = [r for r in rows if r != row]
            at_place = torch.stack([features[r] for r in others])  # (others, N, D)
            flat = changed.flatten()
            assert ((at_place[:, flat] == swapped[row][flat]).all(-1)).any(0).all()
            # inside one rectangle of at most half the grid per side
            ys, xs = changed.nonzero(as_tuple=True)
            assert int(ys.max() - ys.min()) < side // 2 + 1 and int(xs.max() - xs.min()) < side // 2 + 1
    assert changed_frames >= 3  # share 1: every frame with a differing partner is changed
    assert torch.equal(swap_regions_within_story(features, index, batch["story_id"], batch["frame_index"], 0.0, 1, 5), features)
    again = swap_regions_within_story(features, index, batch["story_id"], batch["frame_index"], 1.0, seed=1, step=5)
    assert torch.equal(again, swapped)  # keyed: the same draw for the same (seed, step, story, frame)
    # training reads swapped frames (context and the edited frame), the targets stay true
    _assert_training_reads_changed_frames_and_keeps_targets(module, batch)
    with pytest.raises(ValueError, match="context_swap"):
        _module(tokenizer_dir, context_swap=1.5)


def test_self_read_trains_on_the_models_own_regressions_of_the_frames_it_reads(tiny_world, tokenizer_dir):  # noqa: F811
    from lightning_modules.components.self_read import read_own_regressions

    batch = _batch(tiny_world, n=4, max_images=4)
    module = _module(tokenizer_dir, supervise="all", residual_features=True, queries_from_previous=True, self_read=1.0).train()
    features, index = module.story_features(batch)
    seq = module.story_format.encode_batch(batch["captions"])
    targets = index[seq.target_frames[:, 0], seq.target_frames[:, 1]]
    with torch.no_grad():  # the teacher-forced regression of every frame after the first, computed here on its own
        regressed = module(seq, features, index)[1]
        once = features.clone()
        once[targets] = regressed
        regressed_again = module(seq, features, index, once)[1]
    read = read_own_regressions(module, seq, features, index, None, batch)
    torch.testing.assert_close(read[targets], regressed)  # share 1: every frame after the first is the model's own
    firsts = index[:, 0]
    torch.testing.assert_close(read[firsts], features[firsts])  # the start frames stay true, as in a generated story
    module.self_read_passes = 2  # two regressions deep: read from a context of regressions
    torch.testing.assert_close(read_own_regressions(module, seq, features, index, None, batch)[targets], regressed_again)
    # training reads them (the residual base of each target is the frame before it, as read), targets stay true
    module.self_read_passes = 1
    out = module.forward_story(batch, features, index)
    prev_rows = index[seq.target_frames[:, 0], seq.target_frames[:, 1] - 1]
    torch.testing.assert_close(out.previous_features, read[prev_rows])
    torch.testing.assert_close(out.target_features, features[targets])
    module.losses(out)["loss"].backward()  # gradients flow through the trained pass only
    assert module.output_resampler.parameters().__next__().grad is not None
    # self_read_from: before that training step the model reads the true frames, from it its own
    module.self_read_from = 3
    module._trainer = SimpleNamespace(global_step=2)  # the one trainer fact forward_story reads
    torch.testing.assert_close(module.forward_story(batch, features, index).previous_features, features[prev_rows])
    module._trainer.global_step = 3
    torch.testing.assert_close(module.forward_story(batch, features, index).previous_features, read[prev_rows])
    module._trainer, module.self_read_from = None, 0
    with pytest.raises(ValueError, match="self_read_from"):
        _module(tokenizer_dir, supervise="all", self_read=0.5, self_read_from=-1)
    # a share below one replaces some frames, each by its own keyed draw
    module.self_read = 0.5
    half = read_own_regressions(module, seq, features, index, None, batch)
    replaced = [not torch.equal(half[r], features[r]) for r in targets.tolist()]
    assert any(replaced) and not all(replaced)
    with pytest.raises(ValueError, match="supervise: all"):
        _module(tokenizer_dir, supervise="last", self_read=0.5)


def test_qwen_resamplers_train_and_reload_with_the_classes_that_wrote_them(tiny_world, tokenizer_dir, tmp_path):  # noqa: F811
    import json

    from lightning_modules.components.qwen_resampler import QwenResampler, QwenResamplerConfig

    module = _module(tokenizer_dir, input_resampler=QwenResamplerConfig(heads=2), output_resampler=QwenResamplerConfig(heads=2))
    assert isinstance(module.input_resampler, QwenResampler) and isinstance(module.output_resampler, QwenResampler)
    batch = _batch(tiny_world, n=2, max_images=3)
    terms = module.losses(module.forward_story(batch))
    terms["loss"].backward()
    assert module.input_resampler.query.grad is not None and module.output_resampler.attn.in_proj_weight.grad is not None
    folder = save_mllm(module.eval(), tmp_path / "export")
    assert json.loads((folder / "export.json").read_text())["config"]["output_resampler"]["kind"] == "qwen"
    reloaded = load_mllm(folder)
    assert isinstance(reloaded.output_resampler, QwenResampler)
    with torch.no_grad():
        expected, again = module.forward_story(batch), reloaded.forward_story(batch)
    torch.testing.assert_close(again.predicted_features, expected.predicted_features)
    torch.testing.assert_close(again.logits, expected.logits)
    with pytest.raises(ValueError, match="queries_from_previous needs the perceiver"):
        _module(tokenizer_dir, output_resampler=QwenResamplerConfig(heads=2), queries_from_previous=True)
