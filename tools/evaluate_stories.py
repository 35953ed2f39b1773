"""Reference rows for the story metric table: real frames (the ceiling) and stage-1 reconstructions.

    python -m tools.evaluate_stories --evaluator runs/tiny_evaluator/export \
        --data data/synthetic --split test --source real
    python -m tools.evaluate_stories ... --source reconstruction --detokenizer runs/tiny_stage1/export

Uses the same protocol and metric code as ``train.py test``: frames 1..``steps`` of each story of
the split, scored against the true frames with :class:`~evaluation.story_metrics.StoryMetrics`.
``real`` scores the true frames themselves (what a perfect generator would get);
``reconstruction`` scores the de-tokenizer's redrawing of each true frame from its ViT features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from datamodules.storystream import StoryStreamDataModule
from evaluation.protocol import metric_table
from evaluation.story_metrics import StoryMetrics


@torch.no_grad()
def reference_scores(evaluator_dir: str, data: Path, split: str, source: str, steps: int = 9,
                     detokenizer_dir: str | None = None, num_inference_steps: int | None = None) -> dict[str, float]:
    detokenizer = None
    vit_size = 64
    if source == "reconstruction":
        from lightning_modules.detokenizer import load_detokenizer

        detokenizer = load_detokenizer(detokenizer_dir).eval()
        vit_size = detokenizer.vision_encoder.image_size
    dm = StoryStreamDataModule(**{f"{split}_files": str(data / f"{split}.jsonl")}, image_root=str(data / "images"),
                               vit_image_size=vit_size, image_size=64)
    dm.setup({"test": "test", "val": "validate"}[split])
    dataset = dm.datasets[split]
    metrics = StoryMetrics.from_folder(evaluator_dir)
    for index in range(len(dataset.stories)):
        frames = dataset.load_frames(index, range(1, 1 + steps))
        truth = frames["pixels"]
        if detokenizer is None:
            drawn = truth
        else:
            drawn = detokenizer.reconstruct(frames["vit_pixels"], generator=torch.Generator().manual_seed(index),
                                            num_inference_steps=num_inference_steps)
        n = len(truth)
        metrics.update(drawn, truth, frames["captions"], frames["characters"], [frames["background"]] * n, [frames["story_id"]] * n)
    return metrics.compute()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluator", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--source", default="real", choices=["real", "reconstruction"])
    parser.add_argument("--detokenizer", help="stage-1 export, for --source reconstruction")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--num-inference-steps", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.source == "reconstruction" and not args.detokenizer:
        parser.error("--source reconstruction needs --detokenizer")
    scores = reference_scores(args.evaluator, args.data, args.split, args.source, args.steps, args.detokenizer,
                              args.num_inference_steps)
    print(metric_table(scores))
    if args.out:
        args.out.write_text(json.dumps({"metrics": scores, "source": args.source}, indent=2))


if __name__ == "__main__":
    main()
