"""The real configs end to end on the miniature pretrained folders, from the released weights and from scratch.

The configs are the real ones (``configs/seed_story/``); the arguments below change only paths,
widths and run lengths (CPU, fp32, a few steps). What runs is the real module classes:

- from the converted release: ``train.py predict`` writes stories, and stages 1, 2 and 3 each fit a
  few steps starting from the released weights (``init_from`` for stages 1 and 2; stage 3 reads both);
- the whole recipe as a chain: stage 1 ``fit`` on the mini SD-XL, stage 2 ``fit`` on the mini Llama,
  stage 3 ``fit`` on their exports (also under ``fsdp_cpu``, 2 processes), then ``predict`` (stories,
  storyboards) and ``test`` (``metrics.json``, scored by the mini CLIP) on stage 3's export.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules import synthetic
from tools import convert
from tools.cli import cli_main, config_command
from tools.convert import convert_detokenizer
from tools.mini_pretrained import mini_overrides, write_mini_pretrained

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = "configs/seed_story/data.yaml"
SIZE = 32  # the mini SD-XL's native resolution
CPU_RUN = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
           "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
WARMUP = "--model.init_args.scheduler.init_args.warmup_steps=1"  # the real warm-ups outlast two steps
SHORT_FIT = [*CPU_RUN, "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.val_check_interval=null",
             "--trainer.check_val_every_n_epoch=1", "--trainer.num_sanity_val_steps=0", "--trainer.accumulate_grad_batches=1",
             "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    files = synthetic.generate(root / "world", 8, 0, (SIZE, SIZE))
    world = files["train"].parent
    data = [f"--data.init_args.train_files={files['train']}", f"--data.init_args.val_files={files['val']}",
            f"--data.init_args.test_files={files['test']}", f"--data.init_args.image_root={world / 'images'}",
            f"--data.init_args.image_size=[{SIZE}, {SIZE}]"]
    pretrained = write_mini_pretrained(root / "pretrained")  # the folders a user has, in their formats
    args = mini_overrides(root / "pretrained")
    detokenizer = convert_detokenizer(pretrained["detokenizer"], [DATA, "configs/seed_story/stage1_detokenizer.yaml"],
                                      root / "detokenizer_export", args["stage1"])
    # the README's command line
    convert.main(["agent", "--release", str(pretrained["agent"]), "--tokenizer", str(pretrained["tokenizer"]),
                  "--config", DATA, "--config", "configs/seed_story/stage2_mllm.yaml", "--out", str(root / "mllm_export"),
                  *args["stage2"]])
    return dict(root=root, data=data, val_files=files["val"], stage1=args["stage1"], stage2=args["stage2"],
                generate=args["generate"], detokenizer=detokenizer,
                mllm=root / "mllm_export", pretrained=pretrained)


def _run(config: str, *args: str):
    return cli_main([*config_command(ROOT / config), *args])


def test_predict_writes_stories_from_the_converted_release(converted, tmp_path):
    c = converted
    _run("configs/seed_story/generate.yaml", *CPU_RUN, *c["data"],
         f"--model.init_args.detokenizer_dir={c['detokenizer']}", f"--model.init_args.mllm_dir={c['mllm']}",
         "--model.init_args.evaluator_dir=null", "--model.init_args.generation.steps=2",
         "--model.init_args.generation.num_inference_steps=2", "--model.init_args.generation.decode.max_new_tokens=6",
         f"--data.init_args.predict_files={c['val_files']}", "--trainer.limit_predict_batches=1",
         f"--trainer.default_root_dir={tmp_path}")
    stories = sorted(tmp_path.rglob("story.json"))
    assert stories, "no story written"
    story = json.loads(stories[0].read_text())
    assert len(story["frames"]) == len(story["captions"]) == 3  # the start frame and two generated steps
    # written by the agent: its random miniature weights may pick tokens that decode to nothing
    assert story["given"] == [True, False, False] and all(isinstance(c, str) for c in story["captions"])


def test_stage1_fine_tunes_from_the_released_detokenizer(converted, tmp_path):
    c = converted
    cli = _run("configs/seed_story/stage1_detokenizer.yaml", *SHORT_FIT, *c["data"], *c["stage1"],
               f"--model.init_args.init_from={c['detokenizer']}", f"--trainer.default_root_dir={tmp_path}",
               "--model.init_args.export_dir=null")
    assert cli.trainer.global_step == 2
    released = torch.load(c["pretrained"]["detokenizer"], weights_only=True)
    adapter = cli.model.adapter.state_dict()
    change = max(float((adapter[k] - v).abs().max()) for k, v in released.items() if k.startswith("resampler."))
    assert 0 < change < 1e-2  # two steps away from the released adapter


def test_stage2_fine_tunes_from_the_converted_agent(converted, tmp_path):
    c = converted
    cli = _run("configs/seed_story/stage2_mllm.yaml", *SHORT_FIT, *c["data"], *c["stage2"],
               f"--model.init_args.init_from={c['mllm']}", f"--trainer.default_root_dir={tmp_path}",
               "--model.init_args.export_dir=null", "--data.init_args.max_images=3", WARMUP)
    assert cli.trainer.global_step == 2
    released = torch.load(c["pretrained"]["agent"], weights_only=True)
    key = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    trained = dict(cli.model.llm.named_parameters())[f"base_model.model.{key}"].detach()
    assert torch.allclose(trained, released[f"llm.base_model.model.{key}"], atol=1e-2)  # started from the file's LoRA


def test_stage3_adapts_the_released_detokenizer_to_the_converted_agent(converted, tmp_path):
    c = converted
    cli = _run("configs/seed_story/stage3_adaptation.yaml", *SHORT_FIT, *c["data"],
               f"--model.init_args.detokenizer_dir={c['detokenizer']}", f"--model.init_args.mllm_dir={c['mllm']}",
               "--model.init_args.generation.steps=2", "--model.init_args.generation.num_inference_steps=2",
               f"--trainer.default_root_dir={tmp_path}", "--model.init_args.export_dir=null", "--data.init_args.max_images=3",
               WARMUP)
    assert cli.trainer.global_step == 2


def test_the_tool_writes_the_folders_a_user_has(tmp_path, capsys):
    from tools import mini_pretrained

    mini_pretrained.main([str(tmp_path / "pretrained_mini")])
    written = {str(p.relative_to(tmp_path / "pretrained_mini")) for p in (tmp_path / "pretrained_mini").rglob("*") if p.is_file()}
    for name in ["stable-diffusion-xl-base-1.0/unet/config.json", "stable-diffusion-xl-base-1.0/unet/diffusion_pytorch_model.safetensors",
                 "stable-diffusion-xl-base-1.0/vae/config.json", "stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json",
                 "Llama-2-7b-hf/config.json", "Llama-2-7b-hf/model.safetensors", "Llama-2-7b-hf/tokenizer.model",
                 "Qwen-VL-Chat/model.safetensors.index.json", "qwen_vit_G.pt", "SEED-Story/Agent_7B_George/pytorch_model.bin",
                 "SEED-Story/cvlm_llama2_tokenizer/tokenizer.model", "SEED-Story/cvlm_llama2_tokenizer/added_tokens.json",
                 "SEED-Story/Detokenizer_George/pytorch_model.bin"]:
        assert name in written, name
    assert "--model.init_args.llm.path=" in capsys.readouterr().out  # the arguments for the real configs


# -- the recipe as a chain: every stage from the pretrained folders, then stories and metrics --------

GENERATE_SHORT = ["--model.init_args.generation.steps=2", "--model.init_args.generation.num_inference_steps=2",
                  "--model.init_args.generation.decode.max_new_tokens=6"]


@pytest.fixture(scope="module")
def chain(converted, tmp_path_factory):
    """Stages 1, 2 and 3 fitted in turn with the real configs, each reading the previous exports."""
    c, root = converted, tmp_path_factory.mktemp("chain")
    _run("configs/seed_story/stage1_detokenizer.yaml", *SHORT_FIT, *c["data"], *c["stage1"],
         "--model.init_args.scheduler.init_args.total_iters=1",  # its warm-up, as WARMUP is for the others
         f"--trainer.default_root_dir={root / 'stage1'}")
    _run("configs/seed_story/stage2_mllm.yaml", *SHORT_FIT, *c["data"], *c["stage2"], WARMUP, "--data.init_args.max_images=3",
         f"--trainer.default_root_dir={root / 'stage2'}")
    stage3 = [*c["data"], f"--model.init_args.detokenizer_dir={root / 'stage1' / 'export'}",
              f"--model.init_args.mllm_dir={root / 'stage2' / 'export'}", *GENERATE_SHORT, "--data.init_args.max_images=3", WARMUP]
    _run("configs/seed_story/stage3_adaptation.yaml", *SHORT_FIT, *stage3, f"--trainer.default_root_dir={root / 'stage3'}")
    return dict(root=root, stage3_args=stage3)


def test_the_recipe_runs_as_a_chain_and_its_stories_are_written_and_scored(converted, chain):
    c, root = converted, chain["root"]
    for stage in ("stage1", "stage2", "stage3"):  # each fit wrote its export where the next stage reads it
        assert json.loads((root / stage / "export" / "export.json").read_text())["kind"]
    stories = [*CPU_RUN, *c["data"], *c["generate"], *GENERATE_SHORT,
               f"--model.init_args.detokenizer_dir={root / 'stage3' / 'export'}",
               f"--model.init_args.mllm_dir={root / 'stage2' / 'export'}",
               f"--data.init_args.predict_files={c['val_files']}", "--trainer.limit_predict_batches=2"]
    _run("configs/seed_story/generate.yaml", *stories, f"--trainer.default_root_dir={root / 'stories'}")
    written = sorted((root / "stories").rglob("story.json"))
    val_stories = len(Path(c["val_files"]).read_text().splitlines())
    assert len(written) == min(2, val_stories) and all((p.parent / "storyboard.html").is_file() for p in written)
    story = json.loads(written[0].read_text())
    assert story["given"] == [True, False, False] and len(story["frames"]) == 3
    assert story["detokenizer_dir"].endswith("stage3/export")
    # test: the visualization protocol on the test split, scored by the mini CLIP (no labels: real data's metrics)
    test = ["test", *config_command(ROOT / "configs/seed_story/generate.yaml")[1:], *stories,
            "--model.init_args.test_steps=2", "--trainer.limit_test_batches=2", f"--trainer.default_root_dir={root / 'test'}"]
    cli_main(test)
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    scores = metrics.get("metrics", metrics)
    assert {"fid_evaluator", "clip_i", "clip_t", "story_consistency"} <= set(scores)
    assert not {"character_f1", "background_accuracy"} & set(scores)  # a plain CLIP has no label heads


@pytest.mark.distributed
def test_stage3_runs_sharded_on_two_processes_with_the_real_config(chain, tmp_path):
    cmd = [sys.executable, "train.py", *config_command("configs/seed_story/stage3_adaptation.yaml"),
           "--config", "configs/trainer/fsdp_cpu.yaml", *SHORT_FIT[4:], *chain["stage3_args"],
           "--data.init_args.batch_size=1", f"--trainer.default_root_dir={tmp_path}"]  # SHORT_FIT less CPU_RUN's placement
    done = subprocess.run(cmd, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded run: no export written" in done.stderr  # it says how to consolidate instead
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").is_file()  # a distributed checkpoint: both ranks' shards
    from tools.consolidate import read_checkpoint

    state = read_checkpoint(last)["state_dict"]
    assert any(".unet." in k for k in state) and not any("mllm" in k for k in state)  # the frozen MLLM is never saved
