"""FSDP2 on CPU: per-rank parameter + optimizer bytes and step time, tiny stage 2, 1 vs 2 processes.

    python bench/fsdp_cpu.py [--steps 12] [--batch 8]

Runs ``train.py fit`` on the tiny stage-2 config in a temporary synthetic world, once on one
process and once under ``configs/trainer/fsdp_cpu.yaml`` (2 processes, gloo, same global batch),
with :class:`callbacks.memory.MemoryReportCallback`, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from datamodules import synthetic
from lightning_modules.components.story_llm import LLMSpec
from lightning_modules.language_model import export_untrained
from tools.cli import config_command

ROOT = Path(__file__).resolve().parents[1]


def run(world: Path, llm: Path, out: Path, processes: int, steps: int, batch: int) -> list[dict]:
    out.mkdir(parents=True)
    command = config_command(ROOT / "configs/tiny/stage2_mllm.yaml")  # fit, its overlays, the config
    if processes == 2:
        command += ["--config", "configs/trainer/fsdp_cpu.yaml"]
    cmd = [sys.executable, "train.py", *command,
           f"--data.init_args.train_files={world / 'train.jsonl'}", f"--data.init_args.val_files={world / 'val.jsonl'}",
           f"--data.init_args.test_files={world / 'test.jsonl'}", f"--data.init_args.image_root={world / 'images'}",
           "--data.init_args.synthetic=null", f"--data.init_args.batch_size={batch // processes}",
           f"--model.init_args.llm.path={llm}", f"--model.init_args.story_format.tokenizer={llm}", "--model.init_args.export_dir=null", "--model.init_args.scheduler=null",
           f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
           "--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--trainer.default_root_dir={out}",
           f"--trainer.callbacks+={{'class_path': 'callbacks.memory.MemoryReportCallback', 'init_args': {{'out_dir': '{out}'}}}}"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(p.read_text()) for p in sorted(out.glob("memory_rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        synthetic.generate(world, 40, seed=0, size=(64, 64))
        # the tiny LLM's architecture, untrained: what is measured here is memory and time
        spec = LLMSpec(**yaml.safe_load((ROOT / "configs/tiny/language_model.yaml").read_text())["model"]["init_args"]["llm"])
        llm = export_untrained(spec, [str(world / "train.jsonl")], Path(tmp) / "llm")
        rows = [(1, r) for r in run(world, llm, Path(tmp) / "one", 1, args.steps, args.batch)]
        rows += [(2, r) for r in run(world, llm, Path(tmp) / "two", 2, args.steps, args.batch)]
    print(f"\ntiny stage 2, global batch {args.batch}, {args.steps} steps, CPU (2 cores), fp32\n")
    print("| processes | rank | param MiB | optimizer MiB | step s |")
    print("|-----------|------|-----------|---------------|--------|")
    for processes, r in rows:
        print(f"| {processes:>9} | {r['rank']:>4} | {r['param_bytes'] / 2**20:>9.2f} | {r['optimizer_bytes'] / 2**20:>13.2f} | "
              f"{r['step_seconds']:>6.2f} |")


if __name__ == "__main__":
    main()
