"""Data loading throughput: jsonl + image files vs webdataset shards, 0 vs 2 workers.

    python bench/dataloader.py [--stories 300] [--batches 40] [--size 64] [--vit-size 224]

Makes a synthetic world in a temporary folder, packs its train split into shards, then times
full passes of the stage-2 train loader (random-length story chunks, both views of every
frame). Prints a table of samples/s and images/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from datamodules import synthetic, to_webdataset
from datamodules.storystream import StoryStreamDataModule


def measure(dm: StoryStreamDataModule, max_batches: int) -> tuple[float, float, int]:
    dm.setup("fit")
    loader = dm.train_dataloader()
    samples = images = 0
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        samples += len(batch["story_id"])
        images += int(batch["num_frames"].sum())
        if i + 1 >= max_batches:
            break
    elapsed = time.perf_counter() - start
    return samples / elapsed, images / elapsed, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stories", type=int, default=300)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vit-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        synthetic.generate(world, args.stories, seed=0, size=(args.size, args.size))
        shards, _ = to_webdataset.convert(world / "train.jsonl", world / "images", Path(tmp) / "shards", maxcount=64)
        sources = {
            "jsonl": str(world / "train.jsonl"),
            "webdataset": str(Path(tmp) / "shards" / f"shard-{{000000..{len(shards) - 1:06d}}}.tar"),
        }
        rows = []
        for name, files in sources.items():
            for workers in (0, 2):
                dm = StoryStreamDataModule(
                    train_files=files, image_root=str(world / "images"), batch_size=args.batch_size,
                    num_workers=workers, vit_image_size=args.vit_size, image_size=args.size,
                )
                samples_s, images_s, n = measure(dm, args.batches)
                rows.append((name, workers, n, samples_s, images_s))
    print(f"\nstage-2 train loader, {args.stories} synthetic stories ({args.size}px frames, ViT view {args.vit_size}px), "
          f"batch {args.batch_size}, chunks of 2-10 frames\n")
    print("| source     | workers | samples | samples/s | images/s |")
    print("|------------|---------|---------|-----------|----------|")
    for name, workers, n, samples_s, images_s in rows:
        print(f"| {name:<10} | {workers:>7} | {n:>7} | {samples_s:>9.1f} | {images_s:>8.1f} |")


if __name__ == "__main__":
    main()
