import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import records
from datamodules.dataset import EpochSampler
from datamodules.images import CLIP_MEAN, CLIP_STD, FrameViews
from datamodules.storystream import StoryStreamDataModule, SyntheticWorld
from tests.conftest import data_args


def _datamodule(world, **kw):
    dm = StoryStreamDataModule(**data_args(world, **kw))
    dm.setup("fit")
    return dm


def test_frames_batch_contract(tiny_world):
    dm = _datamodule(tiny_world, mode="frames", vit_image_size=24, image_size=(16, 32))
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["vit_pixels"].shape == (4, 3, 24, 24)
    assert batch["pixels"].shape == (4, 3, 16, 32)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    assert batch["original_size"].tolist() == [[32, 32]] * 4
    assert batch["target_size"].tolist() == [[16, 32]] * 4
    assert len(batch["captions"]) == len(batch["characters"]) == 4 and "skipped" not in batch
    assert len(dm.datasets["train"]) == 16 * 30


def test_stories_batch_contract(tiny_world):
    dm = _datamodule(tiny_world, max_images=6, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    n = batch["num_frames"]
    assert ((n >= 2) & (n <= 6)).all()
    assert batch["vit_pixels"].shape[:2] == batch["frame_mask"].shape == (8, int(n.max()))
    assert (batch["frame_mask"].sum(1) == n).all()
    for row in range(8):
        k = int(n[row])
        assert len(batch["captions"][row]) == len(batch["characters"][row]) == k
        idx = batch["frame_index"][row]
        assert (idx[:k].diff() == 1).all() and (idx[k:] == -1).all()  # consecutive frames, padding marked
        assert batch["pixels"][row, k:].abs().sum() == 0
        story = next(json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()
                     if str(json.loads(line)["id"]) == batch["story_id"][row])
        assert batch["captions"][row] == story["captions"][int(idx[0]) : int(idx[0]) + k]


def test_random_length_chunks_are_reproducible_and_cover_2_to_L(tiny_world):
    dm = _datamodule(tiny_world, max_images=10)
    ds = dm.datasets["train"]
    draws = {epoch: [ds.chunk_bounds(i, epoch) for i in range(len(ds))] for epoch in range(40)}
    assert draws[3] == [ds.chunk_bounds(i, 3) for i in range(len(ds))]
    assert draws[0] != draws[1]
    lengths = {length for d in draws.values() for _, length in d}
    assert lengths == set(range(2, 11))
    again = _datamodule(tiny_world, max_images=10).datasets["train"]
    assert [again.chunk_bounds(i, 7) for i in range(len(ds))] == draws[7]


def test_two_views_of_a_non_square_frame():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 768, 3), dtype=np.uint8))
    views = FrameViews(vit_size=28, image_size=(64, 64))(image)
    assert views["original_size"] == (480, 768)
    # aspect kept: 480x768 -> 64x102, centre crop of width 64 starts at (102 - 64) // 2
    assert views["crop_top_left"] == (0, 19) and views["target_size"] == (64, 64)
    assert views["pixels"].shape == (3, 64, 64)
    flat = np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (flat - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert torch.allclose(views["vit_pixels"], torch.tensor(expected, dtype=torch.float32).permute(2, 0, 1), atol=1e-5)


@pytest.mark.parametrize("size,world", [(16, 2), (17, 2), (10, 3)])
def test_sampler_splits_without_duplicates(size, world):
    for epoch in range(3):
        seen_train, seen_eval = [], []
        for rank in range(world):
            train = EpochSampler(size, world, rank, shuffle=True, seed=0, even=True)
            train.set_epoch(epoch)
            seen_train += [i for i, _ in train]
            seen_eval += [i for i, _ in EpochSampler(size, world, rank, shuffle=False, seed=0, even=False)]
        assert sorted(seen_eval) == list(range(size))
        assert len(seen_train) == len(set(seen_train)) == size - size % world


def test_two_ranks_two_workers_see_every_story_once(tiny_world):
    seen = []
    for rank in range(2):
        dm = StoryStreamDataModule(**data_args(tiny_world, num_workers=2, batch_size=3))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        for loader in (dm.train_dataloader(),):
            seen += [sid for batch in loader for sid in batch["story_id"]]
    assert sorted(seen) == sorted(str(i) for i in range(16))


def test_the_single_rank_loader_reads_as_one_process_on_any_rank_and_leaves_the_training_loader_alone(tiny_world):
    one = _datamodule(tiny_world, batch_size=2)
    expected = [sid for b in one.train_dataloader() for sid in b["story_id"]]
    for rank in range(2):
        dm = StoryStreamDataModule(**data_args(tiny_world, batch_size=2))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.load_state_dict({"epoch": 0, "start_index": 2})  # a resume position, for the training loader only
        assert [sid for b in dm.single_rank_train_loader() for sid in b["story_id"]] == expected
        shard = [sid for b in dm.train_dataloader() for sid in b["story_id"]]
        assert shard == expected[rank::2][2:]


def test_resume_position_skips_what_was_consumed(tiny_world):
    dm = _datamodule(tiny_world, batch_size=2)
    full = [sid for b in dm.train_dataloader() for sid in b["story_id"]]
    resumed = _datamodule(tiny_world, batch_size=2)
    resumed.load_state_dict({"epoch": 0, "start_index": 6})
    rest = [sid for b in resumed.train_dataloader() for sid in b["story_id"]]
    assert rest == full[6:]


def test_missing_paths_fail_in_setup_naming_the_path(tiny_world, tmp_path):
    missing = tmp_path / "nope.jsonl"
    dm = StoryStreamDataModule(**data_args(tiny_world, train_files=str(missing)))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        dm.setup("fit")
    dm = StoryStreamDataModule(**data_args(tiny_world, image_root=str(tmp_path / "no_images")))
    with pytest.raises(FileNotFoundError, match="no_images"):
        dm.setup("fit")


def test_prepare_data_makes_the_synthetic_world_once(tmp_path):
    out = tmp_path / "made"
    kw = data_args(out, synthetic=SyntheticWorld(out=str(out), stories=10, seed=0, size=16))
    dm = StoryStreamDataModule(**kw)
    dm.prepare_data()
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    StoryStreamDataModule(**kw).prepare_data()
    assert (out / "train.jsonl").stat().st_mtime_ns == stamp
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8


def test_a_world_made_with_other_settings_fails_before_training_naming_the_folder(tmp_path):
    out = tmp_path / "made"
    StoryStreamDataModule(**data_args(out, synthetic=SyntheticWorld(out=str(out), stories=10, size=16))).prepare_data()
    asks_more = StoryStreamDataModule(**data_args(out, synthetic=SyntheticWorld(out=str(out), stories=20, size=16)))
    with pytest.raises(ValueError, match=rf"{out}.*'stories': 10.*'stories': 20.*delete"):
        asks_more.prepare_data()
    (out / "world.json").unlink()  # a world made before worlds recorded their settings is taken as it is
    asks_more.prepare_data()
    assert len((out / "train.jsonl").read_text().splitlines()) == 8


# -- bad input -------------------------------------------------------------------------------


@pytest.fixture()
def bad_world(tmp_path, tiny_world):
    """A copy of a few good stories plus one record per kind of bad input."""
    root = tmp_path / "images"
    root.mkdir()
    good = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()[:4]]
    for story in good:
        for rel in story["images"]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes((tiny_world / "images" / rel).read_bytes())
    template = good[0]

    def variant(story_id, **changes):
        record = dict(template, id=story_id)
        record.update(changes)
        return json.dumps(record).encode()

    png = (root / template["images"][0]).read_bytes()
    (root / "zero.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "a_dir.png").mkdir()
    images = template["images"]
    lines = [json.dumps(s).encode() for s in good] + [
        variant("missing", images=images[:5] + ["nowhere.png"] + images[6:]),
        variant("zero", images=["zero.png"] + images[1:]),
        variant("dir", images=images[:2] + ["a_dir.png"] + images[3:]),
        variant("truncated", images=["truncated.png"] * 30),
        b'{"id": "broken", "images": [',
        variant("mismatch", captions=template["captions"][:29]),
        variant("short", images=images[:1], captions=template["captions"][:1], characters=template["characters"][:1]),
        variant("utf8", captions=["ok"] * 29 + ["PLACEHOLDER"]).replace(b"PLACEHOLDER", b"caf\xe9"),
        variant("empty", captions=["ok"] * 29 + ["  "]),
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, root


def test_every_bad_input_is_skipped_and_counted(bad_world, caplog):
    path, root = bad_world
    dm = StoryStreamDataModule(train_files=str(path), image_root=str(root), vit_image_size=16, image_size=16,
                               batch_size=4, min_images=2, max_images=30, shuffle=False)
    dm.setup("fit")
    assert dm.setup_skips.counts == {
        records.MISSING_IMAGE: 1, records.EMPTY_IMAGE: 1, records.NOT_A_FILE: 1, records.MALFORMED_JSON: 1,
        records.LENGTH_MISMATCH: 1, records.TOO_FEW_FRAMES: 1, records.NON_UTF8: 1, records.EMPTY_CAPTION: 1,
    }
    assert f"{path}:" in caplog.text  # warned with file and line
    loaded = [sid for batch in dm.train_dataloader() for sid in dm.on_before_batch_transfer(batch, 0).get("story_id", [])]
    # the truncated image passes the cheap setup check and is caught when decoded
    assert sorted(loaded) == sorted(str(i) for i in range(4))
    report = dm.skip_report()
    assert report[records.UNREADABLE_IMAGE] == 1 and sum(report.values()) == 9


def test_frames_mode_drops_only_the_bad_frame(bad_world):
    path, root = bad_world
    dm = StoryStreamDataModule(train_files=str(path), image_root=str(root), mode="frames", vit_image_size=16, image_size=16)
    dm.setup("fit")
    # 4 good stories + 3 stories with one unusable file each (29 frames kept) + the truncated one (30)
    assert len(dm.datasets["train"]) == 4 * 30 + 3 * 29 + 30
