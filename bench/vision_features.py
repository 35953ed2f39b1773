"""How much of a frame the frozen visual tokenizer keeps: linear read-outs of its features.

    python bench/vision_features.py [--config configs/tiny/vision_encoder.yaml] [--frames 2000]

Fits closed-form ridge regressions on train frames and scores them on val frames:

- **pixels**: each token -> its own ``patch x patch`` RGB patch (a linear de-tokenizer); PSNR of
  the reassembled frame. High PSNR means the tokens keep the picture, spatially in place.
- **characters**: all tokens (flattened) -> which characters are on screen (multi-label); F1.
- **mean token**: the tokens' mean -> characters (F1) and background (accuracy): what is left
  once where things are is averaged away.

The same read-outs from the raw ViT-view pixels, and from the seeded random tower the tiny
pipeline used before its tokenizer was pretrained, give the references. Prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from datamodules.storystream import StoryStreamDataModule
from datamodules.synthetic_world import BACKGROUND_NAMES, CHARACTER_NAMES
from evaluation.evaluator import names_to_multi_hot
from lightning_modules.components.vision_encoder import FrozenVisionEncoder, VisionEncoderConfig


def collect(dm: StoryStreamDataModule, loader, encoder: FrozenVisionEncoder, limit: int) -> dict[str, torch.Tensor]:
    feats, pixels, vit, labels, backgrounds = [], [], [], [], []
    for batch in loader:
        feats.append(encoder(batch["vit_pixels"]))
        vit.append(batch["vit_pixels"])
        pixels.append(batch["pixels"])
        labels.append(names_to_multi_hot(batch["characters"], CHARACTER_NAMES))
        backgrounds.append(torch.nn.functional.one_hot(torch.tensor([BACKGROUND_NAMES.index(b) for b in batch["background"]]),
                                                       len(BACKGROUND_NAMES)).float())
        if sum(len(f) for f in feats) >= limit:
            break
    return {"features": torch.cat(feats)[:limit], "vit": torch.cat(vit)[:limit], "pixels": torch.cat(pixels)[:limit],
            "labels": torch.cat(labels)[:limit], "backgrounds": torch.cat(backgrounds)[:limit]}


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> torch.Tensor:
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(x.T @ x + lam * len(x) * eye, x.T @ y.double())


def apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double() @ w).float()


def patches(pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, grid*grid, 3*ph*pw) row-major patches (the ViT's token order)."""
    b, c, h, w = pixels.shape
    ph, pw = h // grid, w // grid
    return pixels.unfold(2, ph, ph).unfold(3, pw, pw).permute(0, 2, 3, 1, 4, 5).reshape(b, grid * grid, c * ph * pw)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    tp = (pred * target).sum()
    return float(2 * tp / (pred.sum() + target.sum()).clamp_min(1))


def readouts(name: str, train_tokens: torch.Tensor, val_tokens: torch.Tensor, train: dict, val: dict) -> dict:
    grid = int(train_tokens.shape[1] ** 0.5)
    tp, vp = patches(train["pixels"], grid), patches(val["pixels"], grid)
    w = ridge(train_tokens.flatten(0, 1), tp.flatten(0, 1))
    recon = apply(w, val_tokens.flatten(0, 1)).view_as(vp)
    mean_image = train["pixels"].mean(0, keepdim=True).expand_as(val["pixels"])
    wc = ridge(train_tokens.flatten(1), train["labels"], lam=1.0)
    pred = (apply(wc, val_tokens.flatten(1)) > 0.5).float()
    train_mean, val_mean = train_tokens.mean(1), val_tokens.mean(1)
    mean_chars = (apply(ridge(train_mean, train["labels"], lam=1e-3), val_mean) > 0.5).float()
    mean_bg = apply(ridge(train_mean, train["backgrounds"], lam=1e-3), val_mean).argmax(1)
    return {
        "read-out from": name,
        "tokens": f"{train_tokens.shape[1]} x {train_tokens.shape[2]}",
        "patch PSNR dB": f"{psnr(recon, vp):.2f}",
        "mean-image PSNR dB": f"{psnr(mean_image, val['pixels']):.2f}",
        "character F1": f"{f1(pred, val['labels']):.3f}",
        "mean token: character F1": f"{f1(mean_chars, val['labels']):.3f}",
        "mean token: background acc.": f"{float((mean_bg == val['backgrounds'].argmax(1)).float().mean()):.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny/vision_encoder.yaml")
    parser.add_argument("--data", default="data/synthetic", help="a synthetic world folder (quickstart makes it)")
    parser.add_argument("--frames", type=int, default=2000)
    args = parser.parse_args()

    config = VisionEncoderConfig(**yaml.safe_load(Path(args.config).read_text()))
    encoder = FrozenVisionEncoder(config)
    data = Path(args.data)
    dm = StoryStreamDataModule(
        mode="frames", train_files=str(data / "train.jsonl"), val_files=str(data / "val.jsonl"), image_root=str(data / "images"),
        batch_size=100, eval_batch_size=100, vit_image_size=encoder.image_size, image_size=encoder.image_size,
    )
    dm.setup("fit")
    train = collect(dm, dm.train_dataloader(), encoder, args.frames)
    val = collect(dm, dm.val_dataloader(), encoder, args.frames // 4)
    grid = int(train["features"].shape[1] ** 0.5)  # tokens per side
    random_tower = FrozenVisionEncoder(VisionEncoderConfig(image_size=encoder.image_size))  # "tiny_clip", seed 0

    def features(split: dict) -> torch.Tensor:
        return torch.cat([random_tower(v) for v in split["vit"].split(100)])

    rows = [
        readouts(f"frozen tower ({args.config})", train["features"], val["features"], train, val),
        readouts("seeded random tower (tiny_clip)", features(train), features(val), train, val),
        readouts("raw ViT-view pixels", patches(train["vit"], grid), patches(val["vit"], grid), train, val),
    ]
    keys = list(rows[0])
    widths = [max(len(k), *(len(r[k]) for r in rows)) for k in keys]
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(r[k].ljust(w) for k, w in zip(keys, widths)))


if __name__ == "__main__":
    main()
