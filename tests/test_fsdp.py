"""FSDP2 through ModelParallelStrategy on 2 CPU processes (gloo): same training as one process,
half the bytes per rank, exact kill-and-resume, and consolidation of sharded checkpoints."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_modules.detokenizer import load_detokenizer
from tests.conftest import config_command, config_files, llm_args, tower_args
from tests.test_stage3_generation import exports  # noqa: F401  (fixture)
from tests.test_story_mllm import tokenizer_dir  # noqa: F401  (fixture)
from tools.consolidate import consolidate, read_checkpoint

FSDP_CPU = "configs/trainer/fsdp_cpu.yaml"


def _data(world: Path) -> list[str]:
    return [f"--data.init_args.train_files={world / 'train.jsonl'}", f"--data.init_args.val_files={world / 'val.jsonl'}",
            f"--data.init_args.test_files={world / 'test.jsonl'}", f"--data.init_args.image_root={world / 'images'}",
            "--data.init_args.synthetic=null"]


def _fit(out: Path, config: str, extra: list[str], check: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train.py", *config_command(config), *extra,
           f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
           f"--trainer.logger={{'class_path': 'lightning.pytorch.loggers.CSVLogger', 'init_args': {{'save_dir': '{out}'}}}}",
           f"--trainer.callbacks+={{'class_path': 'callbacks.memory.MemoryReportCallback', 'init_args': {{'out_dir': '{out}'}}}}",
           "--model.init_args.export_dir=null"]
    done = subprocess.run(cmd, timeout=900, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _val_losses(out: Path) -> list[float]:
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    return [float(r["val/loss"]) for r in rows if r.get("val/loss")]


def _memory(out: Path, world: int) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"memory_rank*_of{world}.json"))]


def _assert_same_training(single: Path, sharded: Path, rtol: float = 5e-3) -> None:
    a, b = _val_losses(single), _val_losses(sharded)
    assert len(a) == len(b) >= 1, (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) < rtol * max(1.0, abs(x)), (a, b)  # only the reduction order differs


def _assert_half_the_bytes(single: Path, sharded: Path) -> None:
    one, two = _memory(single, 1), _memory(sharded, 2)
    assert len(two) == 2
    for rank in two:
        assert 0.45 < rank["param_bytes"] / one[0]["param_bytes"] < 0.56
        assert 0.45 < rank["optimizer_bytes"] / one[0]["optimizer_bytes"] < 0.56


def _max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _mean_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a) / sum(a[k].numel() for k in a)


@pytest.mark.distributed
@pytest.mark.slow
def test_stage2_fsdp_two_processes_match_one_and_halve_the_bytes(tiny_world, tiny_tower, tiny_llm, tmp_path):
    # the tiny config regressing its features (with its keep-or-code the two runs' val losses differ by ~1.4%
    # after 2 steps: not yet explained, so not claimed)
    regression = ["--model.init_args.codebook=null"]
    common = [*_data(tiny_world), *tower_args(tiny_tower), *llm_args(tiny_llm), "--model.init_args.scheduler=null", *regression,
              "--trainer.max_steps=4", "--trainer.val_check_interval=null", "--trainer.check_val_every_n_epoch=1"]
    _fit(tmp_path / "single", "configs/tiny/stage2_mllm.yaml", [*common, "--data.init_args.batch_size=8"])
    _fit(tmp_path / "fsdp", "configs/tiny/stage2_mllm.yaml", [*common, "--config", FSDP_CPU, "--data.init_args.batch_size=4"])
    assert len(_val_losses(tmp_path / "single")) == 2  # two epochs of 2 steps
    _assert_same_training(tmp_path / "single", tmp_path / "fsdp")
    _assert_half_the_bytes(tmp_path / "single", tmp_path / "fsdp")
    # the sharded last checkpoint consolidates into stage 2's export, which reloads with the trained weights
    sharded = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    export = consolidate(config_files("configs/tiny/stage2_mllm.yaml"), sharded, tmp_path / "export",
                         [*llm_args(tiny_llm), *_data(tiny_world), *tower_args(tiny_tower), *regression])
    from lightning_modules.mllm_export import load_mllm

    reloaded = load_mllm(export).state_dict()
    gathered = read_checkpoint(sharded)["state_dict"]
    shared = [k for k in gathered if k in reloaded]
    assert len(shared) > 10
    assert max(float((gathered[k] - reloaded[k]).abs().max()) for k in shared) < 1e-6  # the export is the checkpoint
    single = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")["state_dict"]
    # and the same training as one process: Adam steps weights with ~0 gradient by ~lr (2e-3) either
    # way, so compare on average (measured: 3.5e-4 after 4 steps)
    assert _mean_weight_difference(single, gathered) < 1e-3


def _stage1_args(world: Path, tower: Path) -> list[str]:
    return [*_data(world), *tower_args(tower), "--data.init_args.image_size=64", "--model.init_args.val_images=0",
            "--model.init_args.scheduler=null", "--trainer.val_check_interval=3", "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1.0", "--data.init_args.eval_batch_size=10"]  # the whole val split


@pytest.mark.distributed
@pytest.mark.slow
def test_stage1_fsdp_two_processes_match_one_and_halve_the_bytes(tiny_world, tiny_tower, tmp_path):
    config = "configs/tiny/stage1_detokenizer.yaml"
    _fit(tmp_path / "single", config, [*_stage1_args(tiny_world, tiny_tower), "--data.init_args.batch_size=4"])
    _fit(tmp_path / "fsdp", config, [*_stage1_args(tiny_world, tiny_tower), "--config", FSDP_CPU, "--data.init_args.batch_size=2"])
    _assert_same_training(tmp_path / "single", tmp_path / "fsdp")
    _assert_half_the_bytes(tmp_path / "single", tmp_path / "fsdp")
    a = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")["state_dict"]
    assert _max_weight_difference(a, b) < 1e-3


@pytest.mark.distributed
@pytest.mark.slow
def test_stage3_fsdp_two_processes_match_one(tiny_world, exports, tmp_path):  # noqa: F811
    config = "configs/tiny/stage3_adaptation.yaml"
    common = [*_data(tiny_world), f"--model.init_args.detokenizer_dir={exports / 'stage1'}",
              f"--model.init_args.mllm_dir={exports / 'stage2'}", "--model.init_args.val_images=0",
              "--model.init_args.scheduler=null", "--trainer.callbacks=[]",
              "--data.init_args.image_size=64",
              "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
              "--data.init_args.eval_batch_size=2"]
    _fit(tmp_path / "single", config, [*common, "--data.init_args.batch_size=4"])
    _fit(tmp_path / "fsdp", config, [*common, "--config", FSDP_CPU, "--data.init_args.batch_size=2"])
    _assert_same_training(tmp_path / "single", tmp_path / "fsdp")
    a = read_checkpoint(tmp_path / "single" / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")["state_dict"]
    start = {f"detokenizer.{k}": v for k, v in load_detokenizer(str(exports / "stage1")).state_dict().items()}
    # Adam moves a weight by ~lr whatever its gradient's size, so the weights whose gradient is ~0 may
    # step the other way when the reduction order changes; on average the two runs agree closely,
    # measured against how far training moved the weights at all
    moved = _mean_weight_difference(a, start)
    assert moved > 0
    assert _mean_weight_difference(a, b) < 0.1 * moved  # 0.076 here with the tiny config


def _steps(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"steps_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_run_killed_resumes_from_last_exactly_and_consolidates(tiny_world, tiny_tower, tmp_path):
    config = "configs/tiny/stage1_detokenizer.yaml"

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return _fit(out, config, [
            *_data(tiny_world), *tower_args(tiny_tower), "--config", FSDP_CPU, "--data.init_args.image_size=64", "--data.init_args.batch_size=2",
            "--model.init_args.scheduler=null", "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
            "--trainer.callbacks+={'class_path': 'lightning.pytorch.callbacks.ModelCheckpoint', 'init_args': "
            "{'every_n_train_steps': 2, 'save_top_k': -1}}",
            f"--trainer.callbacks+={{'class_path': 'tests.helpers.StepLog', 'init_args': {{'path': '{out}/steps_rank{{rank}}.jsonl'}}}}",
            *extra], check=False)

    assert run(tmp_path / "whole").returncode == 0
    crashed = run(tmp_path / "crash", "--trainer.callbacks+={'class_path': 'tests.helpers.KillAtStep', 'init_args': {'step': 3}}")
    assert crashed.returncode != 0  # SIGKILL on both ranks
    assert (tmp_path / "crash" / "checkpoints" / "last.ckpt" / ".metadata").is_file()
    assert not list((tmp_path / "crash" / "checkpoints").glob("*.partial"))
    resumed = run(tmp_path / "crash", "--ckpt_path=last")  # the README's resume command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        trajectory = _steps(tmp_path / "crash", rank)
        reference = _steps(tmp_path / "whole", rank)
        # steps 1-3, killed; resumed from the step-2 checkpoint: steps 3-6 with the same samples and losses
        assert [s["step"] for s in trajectory] == [1, 2, 3, 3, 4, 5, 6]
        trajectory = trajectory[:2] + trajectory[3:]
        assert [(s["ids"], s["frames"]) for s in trajectory] == [(s["ids"], s["frames"]) for s in reference]
        for got, want in zip(trajectory, reference):
            assert abs(got["loss"] - want["loss"]) < 1e-4 * max(1.0, abs(want["loss"])), (trajectory, reference)
    # both final sharded checkpoints consolidate into stage 1's export; diffusers loads the UNet
    folders = [consolidate([*config_files(config), FSDP_CPU], tmp_path / run_name / "checkpoints" / "last.ckpt", tmp_path / f"{run_name}_export",
                           [*_data(tiny_world), *tower_args(tiny_tower)]) for run_name in ("whole", "crash")]
    from diffusers import UNet2DConditionModel

    unets = [UNet2DConditionModel.from_pretrained(e, subfolder="unet").state_dict() for e in folders]
    assert _max_weight_difference(*unets) < 1e-5


def _sharded_mllm_worker(rank: int, port: int, mllm_dir: str, batch: dict, out: str) -> None:
    """One rank: the frozen stage-2 MLLM whole and sharded (as stage 3 holds it), on the same inputs."""
    import os

    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_modules.components.sharding import FSDPSettings
    from lightning_modules.components.story_generator import GenerationSettings, StoryGenerator
    from lightning_modules.mllm_export import exported_story_format, load_mllm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        story_format = exported_story_format(mllm_dir).replace(supervise="all")
        settings = GenerationSettings(steps=4, draw_images=False)
        results = {}
        for name in ("whole", "sharded"):
            mllm = load_mllm(mllm_dir)
            mllm.story_format = story_format
            if name == "sharded":
                mllm.shard(init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)), FSDPSettings())
                assert all(type(p).__name__ == "DTensor" for p in mllm.parameters())  # nothing left whole
            mllm.eval().requires_grad_(False)
            with torch.no_grad():
                features = mllm.forward_story(batch).predicted_features
            story = StoryGenerator(mllm, None, settings).generate(batch["vit_pixels"][0, :1], batch["captions"][0][:1])
            results[name] = {"features": features, "captions": story.captions,
                             "story_features": torch.stack([s.features for s in story.steps])}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_stage3_sharded_mllm_regresses_and_generates_as_one_process(tiny_world, exports, tmp_path):  # noqa: F811
    """Stage 3's frozen MLLM under FSDP (2 ranks): teacher-forced regression and generation go through
    the sharded units and give what the whole model gives (fp32)."""
    import socket

    import torch

    from tests.test_stage3_generation import _stories_batch

    batch = _stories_batch(tiny_world, n=2, frames=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sharded_mllm_worker, args=(port, str(exports / "stage2"), batch, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        whole, sharded = got["whole"], got["sharded"]
        assert whole["features"].shape[0] == 6  # 2 stories x 3 frames after the first
        torch.testing.assert_close(sharded["features"], whole["features"], atol=1e-5, rtol=0)
        assert sharded["captions"] == whole["captions"] and len(whole["captions"]) == 5
        torch.testing.assert_close(sharded["story_features"], whole["story_features"], atol=1e-5, rtol=0)
