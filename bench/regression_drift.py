"""How a story's regressed features drift from the true frames, step by step (no drawing).

    python bench/regression_drift.py --mllm runs/tiny_stage2/export [--data data/synthetic] [--stories 20] [--steps 9]

Each of the test split's first ``--stories`` stories is written from its first frame with its true
captions (visualisation mode, the tiny generation's sink context), so every step reads back the
features regressed before it. Per step, over the stories, the table gives:

- **MSE**: regressed against the true frame's features; **static**: the start frame's features
  against the true frame's (a story that never changes); **moved**: regressed against the start
  frame's (how far the story has moved; a regression that moves as the truth does reaches static);
- **spread**: each token's standard deviation over channels after undoing the tokenizer's final
  LayerNorm affine (every real token has 1.0): below 1 the regression has shrunk toward the mean.

Once as generated, once with ``project_features`` (each regression re-standardised before it is
read back). Needs a stage-2 export whose vision encoder has ``post_layernorm``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from datamodules.storystream import StoryStreamDataModule
from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings, StoryGenerator
from lightning_modules.mllm_export import load_mllm


def spread(features: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Mean over tokens of each token's standard deviation over channels, in the LayerNorm's own units."""
    return ((features - norm.bias) / norm.weight).std(-1, unbiased=False).mean()


def drift(mllm, frames: list[dict], steps: int, project: bool) -> torch.Tensor:
    """(steps, 4): MSE, static MSE, spread and moved MSE per step, averaged over the stories."""
    encoder = mllm.vision_encoder
    norm = encoder._final_norm(encoder.tower)
    settings = GenerationSettings(draw_images=False, context=ContextPolicy(mode="sink"), project_features=project)
    generator = StoryGenerator(mllm, None, settings)
    table = torch.zeros(steps, 4)
    for story in frames:
        true = encoder(story["vit_pixels"]).float()
        written = generator.generate(story["vit_pixels"][:1], story["captions"][:1], captions=story["captions"][1:])
        for t in range(steps):
            regressed = written.steps[t + 1].features
            table[t, 0] += (regressed - true[t + 1]).pow(2).mean()
            table[t, 1] += (true[0] - true[t + 1]).pow(2).mean()
            table[t, 2] += spread(regressed, norm)
            table[t, 3] += (regressed - true[0]).pow(2).mean()
    return table / len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mllm", required=True)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--stories", type=int, default=20)
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    mllm = load_mllm(args.mllm).eval()
    size = mllm.vision_encoder.image_size
    dm = StoryStreamDataModule(test_files=str(args.data / "test.jsonl"), image_root=str(args.data / "images"),
                               vit_image_size=size, image_size=size)
    dm.setup("test")
    dataset = dm.datasets["test"]
    frames = [dataset.load_frames(i, range(args.steps + 1)) for i in range(min(args.stories, len(dataset.stories)))]
    with torch.no_grad():
        plain, projected = drift(mllm, frames, args.steps, False), drift(mllm, frames, args.steps, True)
    print(f"{len(frames)} test stories, true captions, sink context")
    print("| step | MSE | static MSE | moved MSE | spread | MSE, projected | moved, projected | spread, projected |")
    print("|---|---|---|---|---|---|---|---|")
    for t in range(args.steps):
        p, q = plain[t], projected[t]
        print(f"| {t + 1} | {p[0]:.4f} | {p[1]:.4f} | {p[3]:.4f} | {p[2]:.3f} | {q[0]:.4f} | {q[3]:.4f} | {q[2]:.3f} |")


if __name__ == "__main__":
    main()
