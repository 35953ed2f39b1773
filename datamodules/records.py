"""Reading StoryStream records and deciding, per record, whether it is usable.

A record is one jsonl line: ``{"id", "images" (or "image"), "captions", ...}`` with image paths
relative to an image root. Files as other tools write them are read as they are: a UTF-8
byte-order mark, CRLF line ends, blank or whitespace-only lines, unknown fields (kept in
``extra``), and image paths written ``./frames/a.png`` or ``frames\\a.png``. Anything really wrong
with a record is *skipped and counted by kind*, warned once per kind with the file and line,
never raised: one bad line must not stop a training run. Only a wrong path for a whole file or
image root raises, before training.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Skip kinds, used as counter keys and in log messages.
MALFORMED_JSON = "malformed_json"
NON_UTF8 = "non_utf8"
MISSING_FIELD = "missing_field"
LENGTH_MISMATCH = "length_mismatch"
TOO_FEW_FRAMES = "too_few_frames"
EMPTY_CAPTION = "empty_caption"
MISSING_IMAGE = "missing_image"
NOT_A_FILE = "not_a_file"
EMPTY_IMAGE = "empty_image"
UNREADABLE_IMAGE = "unreadable_image"  # decoding failed at load time (truncated, corrupt)

BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, written by e.g. Windows editors and spreadsheet exports


@dataclass
class StoryRecord:
    """One validated story: frames in order, with optional ground truth."""

    story_id: str
    images: list[str]  # paths relative to the image root, or member names inside a shard
    captions: list[str]
    characters: list[list[str]] | None = None
    background: str | None = None
    source: str = ""  # "file:line" for messages
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


class SkipCounter:
    """Counts skipped inputs by kind and warns once per kind with an example location."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._warned: set[str] = set()

    def skip(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("skipping %s at %s%s (further ones are counted, not warned)", kind, where, f": {detail}" if detail else "")

    def merge(self, counts: dict[str, int]) -> None:
        for kind, n in counts.items():
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("skipping %s while loading a batch (further ones are counted, not warned)", kind)
            self.counts[kind] += n

    def total(self) -> int:
        return sum(self.counts.values())


def clean_line(line: bytes) -> bytes:
    """A jsonl line without its byte-order mark, line end and surrounding white space (empty: no record)."""
    return line.removeprefix(BOM).strip()


def image_ref(path: Any) -> str:
    """An image path as written by any tool, in the form the image root joins: ``/`` separators and
    no leading ``./`` (``.\\frames\\a.png`` and ``./frames/a.png`` are ``frames/a.png``)."""
    ref = str(path).strip().replace("\\", "/")
    while ref.startswith("./"):
        ref = ref[2:]
    return ref


def parse_record(line: bytes, source: str, min_frames: int, skips: SkipCounter) -> StoryRecord | None:
    """Parse one jsonl line; return None (and count why) when it is unusable."""
    line = clean_line(line)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        skips.skip(NON_UTF8, source, str(err))
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        skips.skip(MALFORMED_JSON, source, str(err))
        return None
    if not isinstance(raw, dict):
        skips.skip(MALFORMED_JSON, source, "a line must hold a JSON object")
        return None
    images = raw.get("images", raw.get("image"))
    captions = raw.get("captions")
    if not isinstance(images, list) or not isinstance(captions, list):
        skips.skip(MISSING_FIELD, source, "needs lists 'images' and 'captions'")
        return None
    if len(images) != len(captions):
        skips.skip(LENGTH_MISMATCH, source, f"{len(images)} images vs {len(captions)} captions")
        return None
    if len(images) < min_frames:
        skips.skip(TOO_FEW_FRAMES, source, f"{len(images)} frames < {min_frames}")
        return None
    if any(not isinstance(c, str) or not c.strip() for c in captions):
        skips.skip(EMPTY_CAPTION, source)
        return None
    if any(not isinstance(p, str) or not image_ref(p) for p in images):
        skips.skip(MISSING_FIELD, source, "every entry of 'images' must be a path string")
        return None
    characters = raw.get("characters")
    if not _is_cast_list(characters, len(images)):
        characters = None  # ground truth that does not line up is not ground truth
    background = raw.get("background")
    extra = {k: v for k, v in raw.items() if k not in {"id", "images", "image", "captions", "characters", "background", "orders"}}
    return StoryRecord(
        story_id=str(raw.get("id", source)),
        images=[image_ref(p) for p in images],
        captions=[c.strip() for c in captions],
        characters=characters,
        background=background if isinstance(background, str) else None,
        source=source,
        extra=extra,
    )


def _is_cast_list(characters: Any, frames: int) -> bool:
    """Per-frame ground truth: one list of character names per frame."""
    return (isinstance(characters, list) and len(characters) == frames
            and all(isinstance(cast, list) and all(isinstance(name, str) for name in cast) for cast in characters))


def read_jsonl(path: Path, min_frames: int, skips: SkipCounter) -> list[StoryRecord]:
    """All usable records of one jsonl file (bytes are decoded per line so one bad line is local)."""
    records = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not clean_line(line):
                continue
            record = parse_record(line, f"{path}:{number}", min_frames, skips)
            if record is not None:
                records.append(record)
    return records


def caption_corpus(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Every caption string of one jsonl file or several, in order (tokenizer training);
    undecodable lines are passed over."""
    captions: list[str] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        with open(path, "rb") as handle:
            for raw in handle:
                line = clean_line(raw).decode("utf-8", errors="replace")
                try:
                    record = json.loads(line) if line else {}
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("captions"), list):
                    captions += [c for c in record["captions"] if isinstance(c, str)]
    return captions


def check_image_file(path: str) -> str | None:
    """Cheap check made once at setup; returns a skip kind or None. Decoding is checked at load."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return MISSING_IMAGE
    except OSError:
        return MISSING_IMAGE
    if not os.path.isfile(path):
        return NOT_A_FILE
    if stat.st_size == 0:
        return EMPTY_IMAGE
    return None


def record_to_json(record: StoryRecord) -> dict[str, Any]:
    """Inverse of :func:`parse_record` (used by the chunking and shard tools)."""
    out: dict[str, Any] = {"id": record.story_id, "images": record.images, "captions": record.captions}
    if record.characters is not None:
        out["characters"] = record.characters
    if record.background is not None:
        out["background"] = record.background
    out.update(record.extra)
    return out
