"""Records as other tools write them are read, not skipped; real damage is skipped and counted.

The fuzz tests (hypothesis) mutate valid records and damage image bytes at random: the DataModule
never crashes, and every story is either served or counted as skipped, by kind.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datamodules import records
from datamodules.records import SkipCounter, image_ref, parse_record, read_jsonl
from datamodules.storystream import StoryStreamDataModule

SAMPLE_KINDS = {records.UNREADABLE_IMAGE}  # counted when a sample is loaded; every other kind at setup


def _good_records(world: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:n]]


def _datamodule(path: Path, root: Path, **kwargs) -> StoryStreamDataModule:
    args = dict(vit_image_size=16, image_size=16, batch_size=4, min_images=2, max_images=30, shuffle=False)
    return StoryStreamDataModule(train_files=str(path), image_root=str(root), **(args | kwargs))


def _served_story_ids(dm: StoryStreamDataModule) -> list[str]:
    return [sid for batch in dm.train_dataloader() for sid in dm.on_before_batch_transfer(batch, 0).get("story_id", [])]


def test_a_windows_editor_file_gives_exactly_its_record(tiny_world, tmp_path):
    record = _good_records(tiny_world, 1)[0]
    path = tmp_path / "one.jsonl"
    path.write_bytes(records.BOM + json.dumps(record).encode() + b"\r\n" + b"\r\n")  # BOM, CRLF, a trailing blank line
    skips = SkipCounter()
    found = read_jsonl(path, 2, skips)
    assert [r.story_id for r in found] == [str(record["id"])] and skips.total() == 0
    assert found[0].images == record["images"] and found[0].captions == record["captions"]
    assert records.caption_corpus(path) == record["captions"]  # the tokenizers read it too


def test_what_other_tools_write_is_read(tiny_world, tmp_path):
    good = _good_records(tiny_world, 4)
    lines = [
        records.BOM + json.dumps(good[0]).encode() + b"   \t",  # BOM and trailing white space
        b"   ",  # a whitespace-only line
        b"",
        json.dumps(dict(good[1], source_tool="spreadsheet", rating=5)).encode(),  # unknown fields
        json.dumps(dict(good[2], images=["./" + p for p in good[2]["images"]])).encode(),
        json.dumps(dict(good[3], images=[p.replace("/", "\\") for p in good[3]["images"]])).encode(),
        b"\t",
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    dm = _datamodule(path, tiny_world / "images")
    dm.setup("fit")
    assert dm.setup_skips.total() == 0
    stories = dm.datasets["train"].stories
    assert [s.story_id for s in stories] == [str(g["id"]) for g in good]
    assert [s.images for s in stories] == [g["images"] for g in good]  # ./ and backslashes resolve to the same files
    plain = parse_record(json.dumps(good[1]).encode(), "plain:1", 2, SkipCounter())
    assert stories[1].extra == {**plain.extra, "source_tool": "spreadsheet", "rating": 5}  # kept, not a reason to skip
    assert sorted(_served_story_ids(dm)) == sorted(str(g["id"]) for g in good)
    assert sum(dm.skip_report().values()) == 0


@pytest.mark.parametrize("written, ref", [("./a/b.png", "a/b.png"), (".\\a\\b.png", "a/b.png"), ("a\\b.png", "a/b.png"),
                                          (" a/b.png ", "a/b.png"), ("a/b.png", "a/b.png"), ("././a.png", "a.png")])
def test_image_refs_are_normalised(written, ref):
    assert image_ref(written) == ref


def test_a_real_malformation_is_still_skipped_and_named(tiny_world, tmp_path, caplog):
    good = _good_records(tiny_world, 1)[0]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(records.BOM + json.dumps(good).encode() + b"\r\n" + b'{"id": "cut", "images": [\r\n')
    skips = SkipCounter()
    assert len(read_jsonl(path, 2, skips)) == 1
    assert skips.counts == {records.MALFORMED_JSON: 1}
    assert f"{path}:2" in caplog.text


# -- fuzzing ------------------------------------------------------------------------------------

# a mutation of one JSON value: any JSON-ish value, or the field removed
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=8)
FIELDS = ["id", "images", "captions", "characters", "background", "orders", "extra_field"]


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES | st.just("<removed>"), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))
def test_mutated_records_never_raise_and_are_parsed_or_counted(tiny_world, field, value, cut, flips):
    record = dict(_good_records(tiny_world, 1)[0])
    if value == "<removed>":
        record.pop(field, None)
    else:
        record[field] = value
    line = bytearray(json.dumps(record).encode())
    for position, byte in flips:  # random byte damage, then maybe a truncation
        line[position % len(line)] = byte
    if cut:
        line = line[: max(1, len(line) - cut)]
    skips = SkipCounter()
    parsed = parse_record(bytes(line), "fuzz:1", 2, skips)
    assert (parsed is None) == (skips.total() == 1)  # parsed, or counted once by kind
    if parsed is not None:
        assert len(parsed.images) == len(parsed.captions) >= 2
        assert all(isinstance(c, str) and c for c in parsed.captions)


def _damage(data: bytes, rng: random.Random) -> bytes:
    """One random kind of byte damage: truncation, overwritten bytes, a zeroed block, or garbage."""
    kind = rng.choice(["truncate", "flip", "zero", "garbage", "empty"])
    if kind == "truncate":
        return data[: rng.randrange(0, len(data))]
    if kind == "empty":
        return b""
    if kind == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    damaged = bytearray(data)
    start = rng.randrange(0, len(data))
    for i in range(start, min(len(data), start + rng.randrange(1, 64))):
        damaged[i] = 0 if kind == "zero" else rng.randrange(256)
    return bytes(damaged)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_damaged_images_never_crash_the_datamodule_and_every_story_is_served_or_counted(tiny_world, tmp_path_factory,
                                                                                      image_format, seed):
    from PIL import Image

    rng = random.Random(seed)
    good = [dict(r, images=r["images"][:4], captions=r["captions"][:4], characters=r["characters"][:4])
            for r in _good_records(tiny_world, 6)]
    root = tmp_path_factory.mktemp("damaged")
    suffix = ".png" if image_format == "PNG" else ".jpg"
    stories = []
    for story in good:
        refs = []
        for ref in story["images"]:
            name = Path(ref).with_suffix(suffix)
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.open(tiny_world / "images" / ref).convert("RGB").save(root / name, format=image_format)
            refs.append(str(name))
        stories.append(dict(story, images=refs))
    damaged = set()
    for index in rng.sample(range(len(stories)), k=rng.randrange(1, len(stories))):
        ref = rng.choice(stories[index]["images"])
        (root / ref).write_bytes(_damage((root / ref).read_bytes(), rng))
        damaged.add(index)
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in stories) + "\n")

    dm = _datamodule(path, root, max_images=4)
    dm.setup("fit")
    served = _served_story_ids(dm)
    report = dm.skip_report()
    # every story is served once or counted once, and only damaged ones go missing
    assert len(served) + sum(report.values()) == len(stories)
    assert sum(report.values()) <= len(damaged)  # a damaged frame outside the drawn chunk, or still decodable, costs nothing
    assert {str(stories[i]["id"]) for i in range(len(stories)) if i not in damaged} <= set(served)
    assert set(report) <= {records.EMPTY_IMAGE, records.UNREADABLE_IMAGE}
