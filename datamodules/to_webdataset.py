"""Pack a StoryStream jsonl (and its images) into webdataset tar shards.

    python -m datamodules.to_webdataset IN.jsonl --image-root R --out DIR --maxcount K

One sample per story chunk, images inside the tar (see :mod:`datamodules.shards` for the
layout). Records or images that cannot be read are skipped and counted, as in training.
Reading the shards with the DataModule yields the same samples as reading the jsonl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules import records
from datamodules.images import FileStore, UnreadableImage
from datamodules.records import SkipCounter
from datamodules.shards import write_shards


def convert(src: Path, image_root: Path, out: Path, maxcount: int = 1000, min_frames: int = 2) -> tuple[list[str], SkipCounter]:
    skips = SkipCounter()
    store = FileStore(str(image_root))
    usable = []
    for record in records.read_jsonl(src, min_frames, skips):
        bad = next((kind for ref in record.images if (kind := records.check_image_file(store.path(ref)))), None)
        if bad:
            skips.skip(bad, record.source)
            continue
        usable.append(record)

    def read(ref: str) -> bytes:
        try:
            return store.read(ref)
        except UnreadableImage as err:  # vanished between the check and the read
            raise SystemExit(f"could not read {store.path(ref)}: {err}") from err

    return write_shards(usable, read, out, maxcount), skips


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("--image-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    if not args.src.is_file():
        parser.error(f"input file not found: {args.src}")
    if not args.image_root.is_dir():
        parser.error(f"image root not found: {args.image_root} (pass the folder the jsonl's image paths are relative to)")
    shards, skips = convert(args.src, args.image_root, args.out, args.maxcount)
    print(f"wrote {len(shards)} shards to {args.out}; skipped: {dict(skips.counts) or 'none'}")


if __name__ == "__main__":
    main()
