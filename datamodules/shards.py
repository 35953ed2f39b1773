"""Webdataset shards of story chunks: the sample layout and an offset index for random access.

One webdataset sample per story (chunk), key ``s{index:08d}``:
``KEY.json`` holds the record (its ``images`` list names the members below) and
``KEY.000.png``, ``KEY.001.png``, ... hold the frames' original bytes.

Reading builds an index of member offsets by scanning tar headers (no image is decoded), so
shards get the same sampler, random-length chunks and skip handling as jsonl files.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from braceexpand import braceexpand

from datamodules import records
from datamodules.records import SkipCounter, StoryRecord


def is_shard_spec(spec: str) -> bool:
    return ".tar" in spec


def expand_shards(spec: str) -> list[str]:
    """``data/shard-{000000..000003}.tar`` -> the four paths (local files only)."""
    return list(braceexpand(spec))


def frame_member(frame: int, suffix: str) -> str:
    return f"{frame:03d}{suffix}"


def index_shard(path: str, min_frames: int, skips: SkipCounter) -> tuple[list[StoryRecord], dict[str, tuple[str, int, int]]]:
    """Records of one shard and, per image ref ``KEY.MEMBER``, its (path, offset, size)."""
    members: dict[str, tuple[str, int, int]] = {}
    metadata: dict[str, tarfile.TarInfo] = {}
    order: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, member = info.name.partition(".")
            if member == "json":
                metadata[key] = info
                order.append(key)
            else:
                members[f"{key}.{member}"] = (path, info.offset_data, info.size)
        found: list[StoryRecord] = []
        for key in order:
            handle = tar.extractfile(metadata[key])
            line = handle.read() if handle is not None else b""
            record = records.parse_record(line, f"{path}:{key}", min_frames, skips)
            if record is None:
                continue
            record.images = [f"{key}.{name}" for name in record.images]
            found.append(record)
    return found, members


def write_shards(
    stories: list[StoryRecord], read_image, out: Path, maxcount: int, prefix: str = "shard"
) -> list[str]:
    """Write ``stories`` (images fetched with ``read_image(ref) -> bytes``) as tar shards."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for index, story in enumerate(stories):
            sample: dict[str, bytes | str] = {"__key__": f"s{index:08d}"}
            names = []
            for frame, ref in enumerate(story.images):
                name = frame_member(frame, Path(ref).suffix.lower() or ".png")
                sample[name] = read_image(ref)
                names.append(name)
            record = records.record_to_json(story)
            record["images"] = names
            sample["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
            sink.write(sample)
    return sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))
