"""The tiny LLM's text pretraining: a loss that falls, an export stage 2 starts from."""

import csv

import pytest
import torch

from datamodules.story_format import StoryFormatConfig
from datamodules.storystream import StoryStreamDataModule
from lightning_modules.components.story_llm import LLMSpec
from lightning_modules.language_model import LLM_FOLDER, StoryLanguageModelModule
from lightning_modules.story_mllm import StoryMLLMModule
from tests.conftest import config_command, data_args, tiny_init_args
from tools.cli import cli_main

TINY_LM = "configs/tiny/language_model.yaml"


def _data_overrides(world) -> list[str]:
    return [f"--data.init_args.train_files={world / 'train.jsonl'}", f"--data.init_args.val_files={world / 'val.jsonl'}",
            f"--data.init_args.test_files={world / 'test.jsonl'}", "--data.init_args.synthetic=null"]


def test_text_mode_reads_no_image(tiny_world, tmp_path):
    fmt = StoryLanguageModelModule(llm=LLMSpec(config=tiny_init_args(TINY_LM)["llm"]["config"]),
                                   story_format=StoryFormatConfig(tokenizer=str(tmp_path / "tok"), train_vocab_size=300)).story_format
    # no image folder at all: text mode neither checks nor reads one
    dm = StoryStreamDataModule(**data_args(tiny_world, mode="text", batch_size=4, image_root=str(tmp_path / "absent"),
                                           vit_image_size=None), story_format=fmt)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["captions"]) == 4 and all(len(c) == 30 for c in batch["captions"])  # whole stories
    first = batch["sequence"].input_ids[0, : batch["sequence"].attention_mask[0].sum()].tolist()
    assert first == fmt.encode_text(batch["captions"][0]).ids


def test_fit_trains_the_tokenizer_lowers_the_loss_and_stage2_starts_from_the_export(tiny_world, tmp_path):
    cli = cli_main([
        *config_command(TINY_LM), *_data_overrides(tiny_world), "--trainer.max_steps=40", "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.logger={'class_path': 'callbacks.loggers.RunCSVLogger'}", f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=2", f"--model.init_args.story_format.tokenizer={tmp_path / 'tok'}",
    ])
    assert (tmp_path / "tok" / "tokenizer.json").is_file()  # trained on the train split in prepare_data
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    losses = [float(r["train/lm_loss"]) for r in rows if r.get("train/lm_loss")]
    assert len(losses) >= 30 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # it learns the captions
    folder = tmp_path / "export" / LLM_FOLDER
    assert (folder / "tokenizer.json").read_text() == (tmp_path / "tok" / "tokenizer.json").read_text()
    # stage 2 as its tiny config does: the LLM and its tokenizer from the export's llm/ folder
    stage2 = StoryMLLMModule(llm=LLMSpec(path=str(folder)), story_format=StoryFormatConfig(tokenizer=str(folder), num_queries=4))
    stage2.configure_model()
    trained = cli.model.llm.state_dict()
    loaded = stage2.llm.state_dict()
    vocab = trained["model.embed_tokens.weight"].shape[0]
    for name, value in trained.items():
        torch.testing.assert_close(loaded[name][:vocab] if "embed" in name or "lm_head" in name else loaded[name], value, rtol=0, atol=0)
    # the image tokens are stage 2's, new rows at the mean of the pretrained ones
    assert loaded["model.embed_tokens.weight"].shape[0] == vocab + 4 + 2
    torch.testing.assert_close(loaded["model.embed_tokens.weight"][vocab:], trained["model.embed_tokens.weight"].mean(0).expand(6, -1))


def test_stage2_without_the_pretrained_llm_names_the_folder_and_the_stage_that_makes_it(tmp_path):
    missing = tmp_path / "runs" / "tiny_llm" / "export" / "llm"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*configs/tiny/language_model.yaml"):
        StoryMLLMModule(llm=LLMSpec(path=str(missing)), story_format=StoryFormatConfig(tokenizer=str(missing)))
