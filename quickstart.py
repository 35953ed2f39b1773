"""The whole embedded pipeline on a CPU, one command: ``python quickstart.py``.

Makes the synthetic world, trains the evaluator, the visual tokenizer, the tiny LLM and the three stages with the tiny configs (each
through ``train.py fit``), generates 25-step stories (``train.py predict``) and scores the test
split (``train.py test``), then draws the median story by the judge's coherence. A stage whose output already exists is skipped, so a re-run resumes
where the last one stopped; ``--fresh`` starts over. Prints one summary line per stage and,
at the end, where the storyboards, checkpoints, ``metrics.json`` and W&B offline runs are.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
TRAIN = [sys.executable, "train.py"]
DATA = ["--config", "configs/tiny/data.yaml"]  # the overlays every tiny command composes (see each config's first line)
LOGGING = ["--config", "configs/tiny/logging.yaml"]
MEDIAN_STORYBOARD = "runs/tiny_stories/median_storyboard.png"
# the world every tiny config reads, as configs/tiny/data.yaml sets it (written once, there)
WORLD = yaml.safe_load((ROOT / "configs/tiny/data.yaml").read_text())["data"]["init_args"]["synthetic"]


@dataclass
class Stage:
    name: str
    command: list[str]
    done: str  # glob that exists once the stage has finished
    run_dir: str | None = None  # where its CSV logs are, for the summary line


STAGES = [
    Stage("data", [sys.executable, "-m", "datamodules.synthetic", "--out", WORLD["out"], "--stories", str(WORLD["stories"]),
                   "--seed", str(WORLD["seed"]), "--size", str(WORLD["size"])],
          f"{WORLD['out']}/test.jsonl"),
    Stage("evaluator", [*TRAIN, "fit", *DATA, "--config", "configs/tiny/evaluator.yaml"],
          "runs/tiny_evaluator/export/export.json", "runs/tiny_evaluator"),
    # the visual tokenizer stages 1 and 2 read (configs/tiny/vision_encoder.yaml): a separate tiny CLIP
    Stage("tokenizer", [*TRAIN, "fit", *DATA, "--config", "configs/tiny/visual_tokenizer.yaml"],
          "runs/tiny_tokenizer/export/export.json", "runs/tiny_tokenizer"),
    # the LLM stage 2 starts from (configs/tiny/stage2_mllm.yaml): pretrained on the stories' text alone
    Stage("llm", [*TRAIN, "fit", *DATA, *LOGGING, "--config", "configs/tiny/language_model.yaml"],
          "runs/tiny_llm/export/export.json", "runs/tiny_llm"),
    Stage("stage1", [*TRAIN, "fit", *DATA, *LOGGING, "--config", "configs/tiny/stage1_detokenizer.yaml"],
          "runs/tiny_stage1/export/export.json", "runs/tiny_stage1"),
    Stage("stage2", [*TRAIN, "fit", *DATA, *LOGGING, "--config", "configs/tiny/stage2_mllm.yaml"],
          "runs/tiny_stage2/export/export.json", "runs/tiny_stage2"),
    Stage("stage3", [*TRAIN, "fit", *DATA, *LOGGING, "--config", "configs/tiny/stage3_adaptation.yaml"],
          "runs/tiny_stage3/export/export.json", "runs/tiny_stage3"),
    Stage("stories", [*TRAIN, "predict", *DATA, "--config", "configs/tiny/generate.yaml"],
          "runs/tiny_stories/story_*/storyboard.html"),
    Stage("metrics", [*TRAIN, "test", *DATA, "--config", "configs/tiny/generate.yaml"],
          "runs/tiny_stories/metrics.json"),
    # the typical story as a picture: the median by the judge's coherence (the README's storyboard)
    Stage("storyboard", [sys.executable, "-m", "tools.median_story", "runs/tiny_stories", "--out", MEDIAN_STORYBOARD],
          MEDIAN_STORYBOARD),
]


def last_metrics(run_dir: str | None) -> dict[str, float]:
    """The last logged value of every loss/metric in the newest CSV log of a run."""
    if run_dir is None:
        return {}
    logs = sorted(glob.glob(f"{run_dir}/**/metrics.csv", recursive=True), key=lambda p: Path(p).stat().st_mtime)
    if not logs:
        return {}
    latest: dict[str, float] = {}
    with open(logs[-1]) as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if value not in ("", None) and key not in ("epoch", "step") and ("loss" in key or key.startswith("val/")):
                    latest[key] = float(value)
    return latest


def summary(stage: Stage, seconds: float, skipped: bool) -> str:
    if skipped:
        return f"[{stage.name:<9}] skipped (found {stage.done})"
    values = last_metrics(stage.run_dir)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if math.isfinite(v))[:300]
    return f"[{stage.name:<9}] {seconds / 60:5.1f} min  {shown}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help=f"delete {WORLD['out']} and runs/tiny_* first")
    parser.add_argument("--until", choices=[s.name for s in STAGES], help="stop after this stage")
    args = parser.parse_args(argv)
    if args.fresh:
        for path in [WORLD["out"], *glob.glob("runs/tiny_*")]:
            shutil.rmtree(ROOT / path, ignore_errors=True)
    lines, timings = [], {}
    for stage in STAGES:
        if glob.glob(str(ROOT / stage.done)):
            lines.append(summary(stage, 0, skipped=True))
        else:
            print(f"\n=== {stage.name}: {' '.join(stage.command[1:])}", flush=True)
            start = time.perf_counter()
            result = subprocess.run(stage.command, cwd=ROOT)
            timings[stage.name] = time.perf_counter() - start
            if result.returncode != 0 or not glob.glob(str(ROOT / stage.done)):
                print(f"\n{stage.name} failed (exit {result.returncode}); fix it and re-run: finished stages are kept")
                return 1
            lines.append(summary(stage, timings[stage.name], skipped=False))
        print(lines[-1], flush=True)
        if stage.name == args.until:
            break
    print("\n" + "\n".join(lines))
    print(f"\ntotal {sum(timings.values()) / 60:.1f} min this run")
    metrics = ROOT / "runs/tiny_stories/metrics.json"
    print("\nwhere things are:")
    print(f"  storyboards      {ROOT / 'runs/tiny_stories'}/story_*/storyboard.html (the median story: {ROOT / MEDIAN_STORYBOARD})")
    print(f"  checkpoints      {ROOT / 'runs'}/tiny_*/checkpoints/  (resume: the stage's command + --ckpt_path last)")
    print(f"  exports          {ROOT / 'runs'}/tiny_*/export/")
    print(f"  metrics.json     {metrics}")
    retention = ROOT / "runs/tiny_stories/retention.json"
    print(f"  retention.json   {retention}  (per step: the start frame's cast and background still found)")
    print(f"  W&B offline runs {ROOT / 'runs'}/tiny_*/wandb/offline-run-*  (upload later with `wandb sync <dir>`)")
    if metrics.exists():
        print("\n" + json.dumps(json.loads(metrics.read_text())["metrics"], indent=2))
    if retention.exists():
        scores = json.loads(retention.read_text())
        kept = [f"{k}: cast {scores['cast'][k]:.2f} / background {scores['background'][k]:.2f}"
                for k in (0, 1, 5, 10, 25) if k < len(scores["cast"])]
        print("\nwhat the generated stories keep of their start frame, by step:\n  " + "\n  ".join(kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
