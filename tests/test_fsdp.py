"""FSDP2 through ModelParallelStrategy on 2 CPU processes (gloo): same losses, half the bytes."""

import csv
import json
import subprocess
import sys

import pytest

from lightning_modules.components.tokenizer import make_tiny_tokenizer


def _run(tmp_path, name, world, extra):
    out = tmp_path / name
    out.mkdir()
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/tiny/stage2_mllm.yaml", *extra,
           f"--trainer.default_root_dir={out}", "--trainer.max_steps=4", "--trainer.val_check_interval=null",
           "--trainer.check_val_every_n_epoch=1", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
           f"--trainer.logger={{'class_path': 'lightning.pytorch.loggers.CSVLogger', 'init_args': {{'save_dir': '{out}'}}}}",
           f"--trainer.callbacks+={{'class_path': 'callbacks.memory.MemoryReportCallback', 'init_args': {{'out_dir': '{out}'}}}}",
           "--model.init_args.export_dir=null"]
    subprocess.run(cmd, check=True, timeout=900)
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    sizes = [json.loads(p.read_text()) for p in sorted(out.glob(f"memory_rank*_of{world}.json"))]
    return val, sizes


@pytest.mark.distributed
@pytest.mark.slow
def test_stage2_fsdp_two_processes_match_one_and_halve_the_bytes(tiny_world, tmp_path):
    tokenizer = make_tiny_tokenizer(tiny_world / "train.jsonl", tmp_path / "tokenizer")
    data = [f"--data.init_args.train_files={tiny_world / 'train.jsonl'}", f"--data.init_args.val_files={tiny_world / 'val.jsonl'}",
            f"--data.init_args.test_files={tiny_world / 'test.jsonl'}", f"--data.init_args.image_root={tiny_world / 'images'}",
            "--data.init_args.synthetic=null", f"--model.init_args.tokenizer_path={tokenizer}",
            "--model.init_args.scheduler=null"]
    single_val, single_bytes = _run(tmp_path, "single", 1, [*data, "--data.init_args.batch_size=8"])
    sharded_val, sharded_bytes = _run(tmp_path, "fsdp", 2, [*data, "--config", "configs/trainer/fsdp_cpu.yaml",
                                                            "--data.init_args.batch_size=4"])
    assert len(single_val) == len(sharded_val) == 2  # two epochs of 2 steps
    for a, b in zip(single_val, sharded_val):
        assert abs(a - b) < 5e-3 * max(1.0, abs(a)), (single_val, sharded_val)  # reduction order differs
    assert len(sharded_bytes) == 2
    for rank in sharded_bytes:
        assert 0.45 < rank["param_bytes"] / single_bytes[0]["param_bytes"] < 0.56
        assert 0.45 < rank["optimizer_bytes"] / single_bytes[0]["optimizer_bytes"] < 0.56
