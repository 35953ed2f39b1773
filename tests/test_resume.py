"""Crash and resume: a run killed mid-epoch continues exactly where its last checkpoint was."""

import json
import subprocess
import sys

import pytest
import torch

from callbacks.resilience import NonFiniteGuard
from tests.conftest import config_command, tower_args
from tests.helpers import PixelMeanProbe, StepLog


def _fit(world, tower, out, extra):
    cmd = [sys.executable, "train.py", *config_command("configs/tiny/stage1_detokenizer.yaml"), *tower_args(tower),
           f"--data.init_args.train_files={world / 'train.jsonl'}", f"--data.init_args.val_files={world / 'val.jsonl'}",
           f"--data.init_args.test_files={world / 'test.jsonl'}", f"--data.init_args.image_root={world / 'images'}",
           "--data.init_args.synthetic=null", "--data.init_args.batch_size=4", "--data.init_args.image_size=64",
           "--trainer.max_steps=8", "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
           f"--trainer.default_root_dir={out}", "--model.init_args.export_dir=null", "--model.init_args.scheduler=null",
           f"--trainer.callbacks+={{'class_path': 'lightning.pytorch.callbacks.ModelCheckpoint', 'init_args': "
           f"{{'dirpath': '{out}/ckpt', 'every_n_train_steps': 2, 'save_last': true, 'save_top_k': -1}}}}",
           f"--trainer.callbacks+={{'class_path': 'tests.helpers.StepLog', 'init_args': {{'path': '{out}/steps.jsonl'}}}}",
           *extra]
    return subprocess.run(cmd, timeout=900, capture_output=True, text=True)


def _steps(out):
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_with_the_same_steps_samples_and_losses(tiny_world, tiny_tower, tmp_path, signal_name):
    whole = _fit(tiny_world, tiny_tower, tmp_path / "whole", [])
    assert whole.returncode == 0, whole.stderr[-2000:]
    crashed = _fit(tiny_world, tiny_tower, tmp_path / "crash", [
        f"--trainer.callbacks+={{'class_path': 'tests.helpers.KillAtStep', 'init_args': {{'step': 5, 'signal_name': '{signal_name}'}}}}"])
    if signal_name == "SIGKILL":
        assert crashed.returncode != 0  # really killed
    before = _steps(tmp_path / "crash")  # SIGTERM: Lightning stops gracefully at the next step boundary
    assert [s["step"] for s in before] == [1, 2, 3, 4, 5]
    torch.load(tmp_path / "crash" / "ckpt" / "last.ckpt", weights_only=False)  # "last" is complete, not half written
    # a model setting changed on the resume command is not used (LightningCLI takes the checkpoint's), and the run says so
    resumed = _fit(tiny_world, tiny_tower, tmp_path / "crash", ["--ckpt_path", str(tmp_path / "crash" / "ckpt" / "last.ckpt"),
                                                                "--model.init_args.cond_dropout=0.3"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "the checkpoint's model settings are used, not the command line's: cond_dropout 0.3 -> 0.1" in resumed.stderr
    after = _steps(tmp_path / "crash")[len(before):]
    reference = _steps(tmp_path / "whole")
    # resumed from the step-4 checkpoint: steps 5..8 again, with the very same samples and losses
    assert [s["step"] for s in after] == [5, 6, 7, 8]
    trajectory = before[:4] + after
    assert [(s["ids"], s["frames"]) for s in trajectory] == [(s["ids"], s["frames"]) for s in reference]
    for got, want in zip(trajectory, reference):
        assert abs(got["loss"] - want["loss"]) < 1e-5 * max(1.0, abs(want["loss"])), (trajectory, reference)


class _NaNAt(PixelMeanProbe):
    def __init__(self, bad_steps):
        super().__init__()
        self.bad_steps = bad_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.bad_steps else loss


def _guarded_fit(tiny_world, tmp_path, module, guard, steps):
    import lightning as L

    from datamodules.storystream import StoryStreamDataModule
    from tests.conftest import data_args

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[guard], default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=StoryStreamDataModule(**data_args(tiny_world, batch_size=2)))
    return trainer


def test_nonfinite_steps_are_skipped_and_counted(tiny_world, tmp_path):
    module = _NaNAt(bad_steps={2, 3})
    guard = NonFiniteGuard(max_in_a_row=3)
    trainer = _guarded_fit(tiny_world, tmp_path, module, guard, steps=6)
    assert guard.skipped == 2 and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_clearly(tiny_world, tmp_path):
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had non-finite gradients"):
        _guarded_fit(tiny_world, tmp_path, _NaNAt(bad_steps=set(range(100))), NonFiniteGuard(max_in_a_row=3), steps=10)


def test_a_run_resumed_mid_epoch_reads_every_later_epoch_whole(tiny_world, tmp_path):
    """Resumed mid-epoch, a run reads the rest of that epoch and then whole epochs, as the uninterrupted run does
    (4 batches an epoch here: 16 train stories, 4 a batch; resumed after 2 batches of the second epoch)."""
    import lightning as L

    from datamodules.storystream import StoryStreamDataModule
    from tests.conftest import data_args

    def fit(out, steps, ckpt_path=None):
        out.mkdir(exist_ok=True)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=6, save_top_k=-1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=0,
                            callbacks=[checkpoint, StepLog(str(out / "steps.jsonl"))], default_root_dir=out)
        trainer.fit(PixelMeanProbe(), datamodule=StoryStreamDataModule(**data_args(tiny_world, mode="stories")),
                    ckpt_path=ckpt_path)
        return _steps(out)

    whole = fit(tmp_path / "whole", 16)
    first = fit(tmp_path / "part", 6)
    resumed = fit(tmp_path / "part", 16, ckpt_path=str(tmp_path / "part" / "ckpt" / "epoch=1-step=6.ckpt"))[len(first):]
    assert [s["step"] for s in first + resumed] == list(range(1, 17))
    assert [(s["ids"], s["frames"]) for s in first + resumed] == [(s["ids"], s["frames"]) for s in whole]
