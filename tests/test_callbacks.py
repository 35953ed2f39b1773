"""Sample-story and story-metric callbacks in a real (tiny) stage-3 run, logged to offline W&B."""

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

from callbacks.loggers import StoryWandbLogger
from callbacks.sample_stories import SampleStoryCallback
from callbacks.story_evaluation import StoryMetricsCallback
from evaluation.evaluator import StoryEvaluator, save_evaluator, tiny_clip_config, train_caption_word_tokenizer
from tests.conftest import NO_PROJECTION, config_command
from tests.test_stage3_generation import exports  # noqa: F401  (fixture)
from tests.test_story_mllm import tokenizer_dir  # noqa: F401  (fixture)
from tools.cli import cli_main


@pytest.fixture(scope="module")
def evaluator_dir(tiny_world, tmp_path_factory):
    captions = [c for line in (tiny_world / "train.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    tokenizer = train_caption_word_tokenizer(captions)
    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip_config(vocab_size=len(tokenizer), image_size=32, vision_layers=1, text_layers=1))
    return save_evaluator(StoryEvaluator(clip, tokenizer), tmp_path_factory.mktemp("evaluator") / "export")


def _wandb_run(save_dir: Path) -> Path:
    runs = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def _wandb_records(path: Path):
    """Records of a W&B transaction log (its LevelDB-style framing: 32 KiB blocks, 7-byte headers)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, pending, block = path.read_bytes(), 7, b"", 32768  # 7: the ':W&B' file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _history(run: Path) -> list[dict]:
    """Rows of the run's history, read back from its .wandb file."""
    rows = []
    for record in _wandb_records(next(run.glob("*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_stage3_run_logs_stories_and_metrics_to_offline_wandb(tiny_world, exports, evaluator_dir, tmp_path):  # noqa: F811
    logger = StoryWandbLogger(save_dir=str(tmp_path), project="test", offline=True)
    callbacks = [SampleStoryCallback(num_stories=1, steps=2), StoryMetricsCallback(str(evaluator_dir), num_stories=2, steps=2)]
    cli = cli_main([
        *config_command("configs/tiny/stage3_adaptation.yaml")[1:],
        f"--model.init_args.detokenizer_dir={exports / 'stage1'}", f"--model.init_args.mllm_dir={exports / 'stage2'}",
        "--model.init_args.generation.num_inference_steps=2", "--model.init_args.val_images=2",
        NO_PROJECTION,
        f"--model.init_args.export_dir={tmp_path / 'export'}",
        f"--data.init_args.train_files={tiny_world / 'train.jsonl'}", f"--data.init_args.val_files={tiny_world / 'val.jsonl'}",
        f"--data.init_args.test_files={tiny_world / 'test.jsonl'}", f"--data.init_args.image_root={tiny_world / 'images'}",
        "--data.init_args.synthetic=null", "--data.init_args.max_images=3",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--model.init_args.scheduler=null",  # a 2-step run is shorter than the config's warm-up
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false",
    ], run=False)
    keep = [c for c in cli.trainer.callbacks if not isinstance(c, (SampleStoryCallback, StoryMetricsCallback))]
    cli.trainer.callbacks = keep + callbacks  # the config's ones point at the quickstart's evaluator
    cli.trainer.loggers = [logger]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logger.experiment.finish()

    run = _wandb_run(tmp_path)
    rows = _history(run)
    logged = {k for row in rows for k in row}
    for name in ("val/clip_i", "val/story_consistency", "val/character_f1", "val/frame_accuracy", "val/background_accuracy",
                 "val/clip_t", "val/fid_evaluator", "val/psnr_regressed"):
        assert name in logged, (name, sorted(logged))
    table_row = next(row for row in rows if "samples/stories/_type" in row)
    assert table_row["samples/stories/_type"] == "table-file"
    assert any(k.startswith("samples/storyboard_") for k in logged)
    table = json.loads(next(run.glob("files/media/table/samples/stories_*.table.json")).read_text())
    assert table["columns"] == ["story", "mode", "step", "given", "caption", "image"]
    assert len(table["data"]) == 2 * 3  # continuation and visualization, 1 start + 2 steps each
    # the same stories as files in the run directory, for anyone without W&B
    boards = list(Path(cli.trainer.log_dir or tmp_path).rglob("storyboard.html"))
    assert len(boards) == 2 and (tmp_path / "export" / "export.json").is_file()


def _validate_with_callbacks(world, exports, evaluator_dir, out, extra):  # noqa: F811
    import csv
    import subprocess
    import sys

    metrics_cb = {"class_path": "callbacks.story_evaluation.StoryMetricsCallback",
                  "init_args": {"evaluator_dir": str(evaluator_dir), "num_stories": 3, "steps": 2}}
    samples_cb = {"class_path": "callbacks.sample_stories.SampleStoryCallback", "init_args": {"num_stories": 1, "steps": 2}}
    cmd = [sys.executable, "train.py", "validate", *config_command("configs/tiny/stage3_adaptation.yaml")[1:], *extra,
           f"--model.init_args.detokenizer_dir={exports / 'stage1'}", f"--model.init_args.mllm_dir={exports / 'stage2'}",
           "--model.init_args.generation.num_inference_steps=2", "--model.init_args.val_images=0",
           NO_PROJECTION,
           # 16 train stories as the val split: 3 stories over 2 ranks is an uneven share
           f"--data.init_args.train_files={world / 'train.jsonl'}", f"--data.init_args.val_files={world / 'train.jsonl'}",
           f"--data.init_args.test_files={world / 'test.jsonl'}", f"--data.init_args.image_root={world / 'images'}",
           "--data.init_args.synthetic=null", "--data.init_args.max_images=3",
           "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={out}",
           f"--trainer.callbacks={json.dumps([metrics_cb, samples_cb])}",
           f"--trainer.logger={{'class_path': 'lightning.pytorch.loggers.CSVLogger', 'init_args': {{'save_dir': '{out}'}}}}"]
    done = subprocess.run(cmd, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


@pytest.mark.distributed
@pytest.mark.slow
def test_story_callbacks_under_fsdp_generate_on_every_rank_and_match_one_process(tiny_world, exports, evaluator_dir, tmp_path):  # noqa: F811
    single = _validate_with_callbacks(tiny_world, exports, evaluator_dir, tmp_path / "single", [])
    sharded = _validate_with_callbacks(tiny_world, exports, evaluator_dir, tmp_path / "fsdp",
                                       ["--config", "configs/trainer/fsdp_cpu.yaml"])
    names = ("val/clip_i", "val/clip_t", "val/character_f1", "val/frame_accuracy", "val/background_accuracy",
             "val/story_consistency", "val/fid_evaluator")
    for name in names:
        assert name in single and name in sharded, (name, sorted(single), sorted(sharded))
        # the same 3 stories, split 2 + 1 (+ 1 padding generation) across the ranks, synced
        assert abs(single[name] - sharded[name]) < 1e-3 * max(1.0, abs(single[name])), (name, single, sharded)
    # rank zero alone wrote the sample stories
    boards = list((tmp_path / "fsdp").rglob("storyboard.html"))
    assert len(boards) == 2  # 1 story x (continuation, visualization)
