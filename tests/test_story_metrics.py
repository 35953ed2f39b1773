"""Story metrics against direct computations (numpy/scipy, plain cosines, hand-made label sets)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import CLIPModel

from datamodules.synthetic_world import BACKGROUND_NAMES, CHARACTER_NAMES
from evaluation.evaluator import (
    StoryEvaluator,
    load_evaluator,
    save_evaluator,
    tiny_clip_config,
    train_caption_word_tokenizer,
)
from evaluation.story_metrics import (
    BackgroundAccuracy,
    CharacterF1,
    CLIPTextAlignment,
    CosineSimilarity,
    FrameAccuracy,
    StoryConsistency,
    StoryFID,
    StoryMetrics,
    to_uint8,
)

CAPTIONS = [
    "Bolt is alone in the meadow.",
    "Pip enters on the left. Bolt watches.",
    "Mira jumps high.",
    "Zed and Luna meet and say hello.",
    "Rex sits down to rest.",
    "Tiko waves hello.",
]


def random_evaluator(seed: int = 0) -> StoryEvaluator:
    """A seeded, untrained evaluator at 32 px: enough to check that metrics compute the right thing."""
    tokenizer = train_caption_word_tokenizer(CAPTIONS * 2)
    config = tiny_clip_config(len(tokenizer), image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                              text_width=32, text_layers=1, num_heads=2, projection_dim=16)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StoryEvaluator(CLIPModel(config), tokenizer).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_evaluator(random_evaluator(), tmp_path_factory.mktemp("evaluator"))


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """[-1, 1] images on the uint8 grid, so the uint8 round trip of torchmetrics' inputs is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1.0


def quantised(x: torch.Tensor) -> torch.Tensor:
    return to_uint8(x).float() / 127.5 - 1.0


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_on_the_same_features():
    evaluator = random_evaluator()
    real = images(64, 1)
    fake = quantised(images(64, 2) * 0.3 + 0.4)  # a duller, brighter set
    fid = StoryFID(evaluator=evaluator)
    assert fid.label == "fid_evaluator"
    for chunk in range(0, 64, 16):  # several updates: the running sums must add up
        fid.update(real[chunk : chunk + 16], real=True)
        fid.update(fake[chunk : chunk + 16], real=False)
    value = float(fid.compute())
    ref = scipy_fid(evaluator.image_features(real).double().numpy(), evaluator.image_features(fake).double().numpy())
    assert value > 0.05  # different image sets are apart ...
    assert value == pytest.approx(ref, rel=1e-3, abs=1e-5)
    same = StoryFID(evaluator=evaluator)
    same.update(real, real=True)
    same.update(real, real=False)
    assert abs(float(same.compute())) < 1e-3  # ... and a set is at distance ~0 from itself


def test_fid_does_not_expose_the_evaluator_as_parameters():
    fid = StoryFID(evaluator=random_evaluator())
    assert list(fid.parameters()) == []
    with pytest.raises(ValueError):
        StoryFID()
    with pytest.raises(FileNotFoundError):
        StoryFID(inception_weights_path="/nonexistent/inception.pth")


def test_clip_i_and_consistency_equal_direct_cosines():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    clip_i = CosineSimilarity()
    clip_i.update(a[:4], b[:4])
    clip_i.update(a[4:], b[4:])
    assert float(clip_i.compute()) == pytest.approx(F.cosine_similarity(a, b).mean().item(), abs=1e-6)

    ids = ["s1"] * 3 + ["s2"] * 4 + ["s3"]  # s3 has one frame: no pair, left out
    consistency = StoryConsistency()
    consistency.update(a[:5], ids[:5])  # s2 spans two updates
    consistency.update(a[5:8], ids[5:8])
    n = F.normalize(a, dim=-1)
    s1 = [(n[i] @ n[j]).item() for i in range(3) for j in range(3) if i != j]
    s2 = [(n[i] @ n[j]).item() for i in range(3, 7) for j in range(3, 7) if i != j]
    assert float(consistency.compute()) == pytest.approx((np.mean(s1) + np.mean(s2)) / 2, abs=1e-6)


def test_label_metrics_on_hand_made_sets():
    names = ("A", "B", "C")
    preds = [{"A"}, {"A", "B"}, set(), {"C"}]
    target = [["A"], ["A"], ["B"], ["C", "A"]]
    # tp: A, A, C = 3; fp: B = 1; fn: B, A = 2 -> F1 = 2*3 / (2*3 + 1 + 2)
    f1 = CharacterF1(names)
    f1.update(preds, target)
    assert float(f1.compute()) == pytest.approx(6 / 9)
    acc = FrameAccuracy(names)
    acc.update(preds[:2], target[:2])
    acc.update(preds[2:], target[2:])
    assert float(acc.compute()) == pytest.approx(1 / 4)  # only the first frame matches exactly
    bg = BackgroundAccuracy(("meadow", "night", "cave"))
    bg.update(["meadow", "night", "cave"], ["meadow", "cave", "cave"])
    assert float(bg.compute()) == pytest.approx(2 / 3)


def test_start_cast_retention_on_hand_made_stories():
    from evaluation.retention import StartCastRetention, retention_table

    metric = StartCastRetention(max_steps=3)
    # story 1: start cast {A, B} in the meadow; frame 1 keeps A only, frame 2 keeps both but the background changes
    metric.update([{"A", "B"}, {"A", "C"}, {"A", "B"}], ["meadow", "meadow", "night"], ["A", "B"], "meadow")
    # story 2: start cast {C} in the cave, only two frames (and a fourth would be past max_steps)
    metric.update([{"C"}, set()], ["cave", "cave"], ["C"], "cave")
    scores = metric.compute()
    assert scores["cast"].tolist() == pytest.approx([3 / 3, 1 / 3, 2 / 2])
    assert scores["background"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert scores["stories"].tolist() == [2, 2, 1]
    table = retention_table(scores)
    assert "| 1 | 0.333 | 1.000 | 2 |" in table and "| 5 |" not in table  # only steps the stories reached


def test_clip_t_loads_the_saved_evaluator_and_equals_direct_cosine(evaluator_dir):
    evaluator = load_evaluator(evaluator_dir)
    frames = images(6, 3)
    clip_t = CLIPTextAlignment(evaluator_dir)
    assert list(clip_t.parameters()) == []  # CLIP stays out of any optimizer
    clip_t.update(frames[:3], CAPTIONS[:3])
    clip_t.update(frames[3:], CAPTIONS[3:])
    cos = (evaluator.image_features(frames) * evaluator.text_features(CAPTIONS)).sum(-1)
    assert float(clip_t.compute()) == pytest.approx(max(cos.mean().item(), 0.0), abs=1e-4)


def test_story_metrics_end_to_end(evaluator_dir):
    metrics = StoryMetrics.from_folder(evaluator_dir)
    evaluator = load_evaluator(evaluator_dir)
    true, gen = images(8, 4), images(8, 5)
    chars = [["Bolt"], ["Bolt", "Pip"], [], ["Mira"]] * 2
    bgs = ["meadow", "night", "cave", "snow"] * 2
    ids = ["0"] * 4 + ["1"] * 4
    metrics.update(gen, true, CAPTIONS[:4] * 2, chars, bgs, ids)
    out = metrics.compute()
    assert set(out) == {"fid_evaluator", "clip_i", "story_consistency", "character_f1", "frame_accuracy",
                        "background_accuracy", "clip_t"}  # fmt: skip
    expected_clip_i = F.cosine_similarity(evaluator.image_features(gen), evaluator.image_features(true)).mean()
    assert out["clip_i"] == pytest.approx(expected_clip_i.item(), abs=1e-5)
    pred_chars, pred_bgs = evaluator.predict_labels(gen)
    assert out["frame_accuracy"] == pytest.approx(
        np.mean([p == set(t) for p, t in zip(pred_chars, chars, strict=True)])
    )
    assert out["background_accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(pred_bgs, bgs, strict=True)]))
    # perfect generations: the truth scored against itself
    metrics.reset()
    metrics.update(true, true, CAPTIONS[:4] * 2, chars, bgs, ids)
    perfect = metrics.compute()
    assert perfect["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert abs(perfect["fid_evaluator"]) < 1e-3


def test_to_uint8_maps_the_pixel_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert to_uint8(x).flatten().tolist() == [0, 128, 255, 255]


# -- distributed: two gloo processes give the one-process value ------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple:
    true, gen = images(12, 6), images(12, 7)
    chars = [[CHARACTER_NAMES[i % 3]] for i in range(12)]
    bgs = [BACKGROUND_NAMES[i % 4] for i in range(12)]
    caps = [CAPTIONS[i % 6] for i in range(12)]
    ids = [str(i // 5) for i in range(12)]  # stories of 5, 5, 2 frames: story 1 straddles the ranks
    return gen, true, caps, chars, bgs, ids


def _rows(data: tuple, index: list[int]) -> tuple:
    return tuple(d[index] if isinstance(d, torch.Tensor) else [d[i] for i in index] for d in data)


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = StoryMetrics.from_folder(folder)
        data = _data()
        metrics.update(*_rows(data, list(range(rank, 12, world))))  # interleaved split across ranks
        torch.save(metrics.compute(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_agree_with_one(evaluator_dir, tmp_path):
    single = StoryMetrics.from_folder(evaluator_dir)
    single.update(*_data())
    expected = single.compute()
    mp.spawn(_worker, args=(2, _free_port(), str(evaluator_dir), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


class EchoGenerator:
    """Draws each given caption's true frame: the protocol must score exactly the frames after the start."""

    device = torch.device("cpu")

    def __init__(self, frames: dict):
        self.frames = frames

    def generate_story(self, vit_pixels, captions, images, given_captions=None, settings=None):
        from types import SimpleNamespace

        start = [SimpleNamespace(image=image, given=True) for image in images]
        drawn = [SimpleNamespace(image=self.frames["pixels"][len(start) + i], given=False) for i in range(len(given_captions))]
        return SimpleNamespace(steps=start + drawn)


def test_the_protocol_scores_the_frames_after_the_start_and_skips_a_single_frame_story(evaluator_dir):
    from evaluation.protocol import score_story

    metrics = StoryMetrics.from_folder(evaluator_dir)
    pixels = images(3, 7)
    story = {"captions": CAPTIONS[:3], "vit_pixels": pixels, "pixels": pixels, "characters": [["Bolt"], ["Bolt", "Pip"], ["Mira"]],
             "background": "meadow", "story_id": "s"}
    assert score_story(EchoGenerator(story), metrics, story) is True
    assert int(metrics.metrics["clip_i"].count) == 2  # frames 1 and 2; the start frame is given, not scored
    assert metrics.compute()["clip_i"] == pytest.approx(1.0, abs=1e-5)  # the truth drawn: a perfect score
    single = {**story, "captions": story["captions"][:1], "vit_pixels": pixels[:1], "pixels": pixels[:1]}
    assert score_story(EchoGenerator(single), metrics, single) is False  # nothing to draw: skipped, no error
    assert int(metrics.metrics["clip_i"].count) == 2


def test_rank_share_gives_every_rank_the_same_number_of_generations():
    from evaluation.protocol import rank_share

    shares = [rank_share(3, rank, 2) for rank in (0, 1)]
    assert shares == [[0, 2], [1, -1]]  # -1: a padding generation, not scored
    assert sorted(i for s in shares for i in s if i >= 0) == [0, 1, 2]
    assert rank_share(4, 1, 2) == [1, 3] and rank_share(1, 0, 1) == [0]
