"""Reference rows for the story metric table: real frames (the ceiling), stage-1 reconstructions and
one-step regressions.

    python -m tools.evaluate_stories --evaluator runs/tiny_evaluator/export \
        --data data/synthetic --split test --source real
    python -m tools.evaluate_stories ... --source reconstruction --detokenizer runs/tiny_stage1/export
    python -m tools.evaluate_stories ... --source regressed --detokenizer runs/tiny_stage3/export \
        --mllm runs/tiny_stage2/export
    python -m tools.evaluate_stories ... --source copy --detokenizer runs/tiny_stage1/export

Uses the same protocol and metric code as ``train.py test``: frames 1..``steps`` of each story of
the split, scored against the true frames with :class:`~evaluation.story_metrics.StoryMetrics`.
``real`` scores the true frames themselves (what a perfect generator would get);
``reconstruction`` scores the de-tokenizer's redrawing of each true frame from its ViT features;
``regressed`` draws each frame from the features the stage-2 MLLM regresses for it from the true
frames and captions before it (teacher forced: one step of a story with nothing of its own read
back, which separates what one regression loses from what a generated story compounds);
``copy`` draws each frame from the true features of the frame before it, the drawing a one-step
regression must beat (lowering the feature MSE is not enough: a hedged edit can draw worse than no edit).
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
                     detokenizer_dir: str | None = None, num_inference_steps: int | None = None,
                     mllm_dir: str | None = None, guidance_scale: float | None = None, sheet: Path | None = None,
                     sheet_stories: int = 4, stories: int | None = None, sampler: str | None = None) -> dict[str, float]:
    """Scores of ``source``'s frames over the split's first ``stories`` stories (all by default; the
    test command with ``limit_test_batches`` x batch size stories scores the same ones). With
    ``sheet``, also a picture of the first ``sheet_stories`` stories: each story's true frames in one
    row and the frames scored under them."""
    detokenizer = mllm = None
    rows: list[torch.Tensor] = []
    vit_size = 64
    if source != "real":
        from lightning_modules.detokenizer import load_detokenizer

        detokenizer = load_detokenizer(detokenizer_dir).eval()
        vit_size = detokenizer.vision_encoder.image_size
    if source == "regressed":
        from lightning_modules.mllm_export import load_mllm

        mllm = load_mllm(mllm_dir)
    dm = StoryStreamDataModule(**{f"{split}_files": str(data / f"{split}.jsonl")}, image_root=str(data / "images"),
                               vit_image_size=vit_size, image_size=64)
    dm.setup({"test": "test", "val": "validate"}[split])
    dataset = dm.datasets[split]
    metrics = StoryMetrics.from_folder(evaluator_dir)
    count = len(dataset.stories) if stories is None else min(stories, len(dataset.stories))
    for index in range(count):
        frames = dataset.load_frames(index, range(1, 1 + steps))
        truth = frames["pixels"]
        generator = torch.Generator().manual_seed(index)
        if detokenizer is None:
            drawn = truth
        elif mllm is None:  # reconstruction redraws each scored frame, copy the true frame before it
            shown = dataset.load_frames(index, range(0, steps))["vit_pixels"] if source == "copy" else frames["vit_pixels"]
            drawn = detokenizer.reconstruct(shown, generator=generator, num_inference_steps=num_inference_steps,
                                            guidance_scale=guidance_scale, sampler=sampler)
        else:
            features = teacher_forced_features(mllm, dataset.load_frames(index, range(0, 1 + steps)))
            drawn = detokenizer.decode(features, generator=generator, num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale, sampler=sampler)
        n = len(truth)
        if sheet is not None and index < sheet_stories:
            rows += [truth, drawn.to(truth.dtype)]
        metrics.update(drawn, truth, frames["captions"], frames["characters"], [frames["background"]] * n, [frames["story_id"]] * n)
    if sheet is not None:
        from torchvision.utils import save_image

        save_image((torch.cat(rows).float() + 1) / 2, sheet, nrow=steps, padding=1)
    return metrics.compute()


def teacher_forced_features(mllm, frames: dict) -> torch.Tensor:
    """The features the MLLM regresses for frames ``1..n-1`` of ``frames``, each from the true frames
    and captions before it (one pass per frame, so any ``supervise`` setting gives the same)."""
    regressed = []
    for end in range(2, len(frames["captions"]) + 1):
        batch = {"vit_pixels": frames["vit_pixels"][None, :end], "frame_mask": torch.ones(1, end, dtype=torch.bool),
                 "captions": [frames["captions"][:end]]}
        regressed.append(mllm.forward_story(batch).predicted_features[-1])
    return torch.stack(regressed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluator", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--source", default="real", choices=["real", "reconstruction", "regressed", "copy"])
    parser.add_argument("--detokenizer", help="a de-tokenizer export (stage 1 or 3), for every --source but real")
    parser.add_argument("--mllm", help="a stage-2 export, for --source regressed")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--stories", type=int, help="score the split's first N stories (default: all)")
    parser.add_argument("--num-inference-steps", type=int)
    parser.add_argument("--sampler", choices=["euler", "dpmpp"], help="the diffusion sampler (default: euler)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the de-tokenizer's own)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sheet", type=Path, help="a PNG of the first stories: true frames above the frames scored")
    parser.add_argument("--sheet-stories", type=int, default=4)
    args = parser.parse_args(argv)
    if args.source != "real" and not args.detokenizer:
        parser.error(f"--source {args.source} needs --detokenizer")
    if args.source == "regressed" and not args.mllm:
        parser.error("--source regressed needs --mllm")
    scores = reference_scores(args.evaluator, args.data, args.split, args.source, args.steps, args.detokenizer,
                              args.num_inference_steps, args.mllm, args.guidance_scale, args.sheet, args.sheet_stories,
                              args.stories, args.sampler)
    print(metric_table(scores))
    if args.out:
        args.out.write_text(json.dumps({"metrics": scores, "source": args.source}, indent=2))


if __name__ == "__main__":
    main()
