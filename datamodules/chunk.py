"""Cut stories into fixed-length chunks with StoryStream's own semantics.

    python -m datamodules.chunk IN.jsonl OUT.jsonl --length 10

Non-overlapping chunks ``range(0, n, length)``; an incomplete tail is dropped; each chunk's
``id`` is the index of its source story in IN; ``orders`` is dropped. Any other per-frame list
(one entry per image, e.g. ground-truth ``characters``) is chunked alongside; per-story fields
(e.g. ``background``) are copied. Lines that are not JSON objects are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def chunk_story(story: dict[str, Any], source_index: int, length: int) -> Iterator[dict[str, Any]]:
    image_key = "images" if "images" in story else "image"
    n = len(story[image_key])
    per_frame = [k for k, v in story.items() if isinstance(v, list) and len(v) == n and k != "orders"]
    for start in range(0, n, length):
        if start + length > n:
            break  # incomplete tail
        chunk: dict[str, Any] = {"id": source_index}
        for key, value in story.items():
            if key in ("id", "orders"):
                continue
            chunk[key] = value[start : start + length] if key in per_frame else value
        yield chunk


def chunk_file(src: Path, dst: Path, length: int = 10) -> tuple[int, int, int]:
    """Write the chunks of every story in ``src``; return (stories, chunks, skipped lines)."""
    stories = chunks = skipped = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("w", encoding="utf-8") as fout:
        for index, line in enumerate(fin):
            try:
                story = json.loads(line)
                if not isinstance(story, dict) or not ("images" in story or "image" in story):
                    raise ValueError("no 'images' list")
            except (ValueError, UnicodeDecodeError) as err:
                skipped += 1
                log.warning("%s:%d skipped: %s", src, index + 1, err)
                continue
            stories += 1
            for chunk in chunk_story(story, index, length):
                fout.write(json.dumps(chunk, ensure_ascii=False) + "\n")
                chunks += 1
    return stories, chunks, skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--length", type=int, default=10)
    args = parser.parse_args(argv)
    if not args.src.is_file():
        parser.error(f"input file not found: {args.src}")
    stories, chunks, skipped = chunk_file(args.src, args.dst, args.length)
    print(f"{stories} stories -> {chunks} chunks of {args.length} in {args.dst} ({skipped} bad lines skipped)")


if __name__ == "__main__":
    main()
