"""The judge reads every caption the world writes, and scores hand-made stories as worked out by hand."""

from __future__ import annotations

import random

import pytest

from datamodules.synthetic import make_story
from evaluation.judge import distinct_share, judge_story, read_caption, summarize


def _truth(story: dict) -> list[dict]:
    return [{"characters": sorted(a.name for a in actors), "background": story["background"].name} for actors in story["states"]]


def test_every_story_the_world_writes_is_valid_possible_and_coherent_with_its_ground_truth():
    rng = random.Random(0)
    for index in range(60):
        story = make_story(rng, index)
        labels = _truth(story)
        judged = judge_story(story["captions"], labels, labels[0]["characters"], story["background"].name)
        assert all(judged["valid"]) and all(judged["possible"]), story["captions"]
        assert judged["coherence"] == [1.0] * len(story["captions"])
        assert all(judged["background_kept"])


MEADOW = "in the meadow"


@pytest.mark.parametrize("caption, before, valid, possible, after", [
    ("Pip jumps high. Rex and Tiko watch.", {"Pip", "Rex", "Tiko"}, True, True, {"Pip", "Rex", "Tiko"}),
    ("Rex jumps high. Rex and Rex watch.", {"Rex", "Pip"}, False, False, {"Rex", "Pip"}),  # a name twice
    ("Pip jumps high. Rex and Tiko watches.", {"Pip", "Rex", "Tiko"}, False, False, {"Pip", "Rex", "Tiko"}),  # agreement
    ("Pip enters on the left. Rex watches.", {"Pip", "Rex"}, True, False, {"Pip", "Rex"}),  # already there
    ("Mira enters in the middle. Rex watches.", {"Rex"}, True, True, {"Mira", "Rex"}),
    ("Zed enters on the right. Rex, Pip and Mira watch.", {"Rex", "Pip", "Mira"}, True, False, {"Zed", "Rex", "Pip", "Mira"}),
    ("Rex leaves and Pip stays in the meadow.", {"Rex", "Pip"}, True, True, {"Pip"}),
    ("Rex leaves and Pip stays in the desert.", {"Rex", "Pip"}, True, False, {"Pip"}),  # another place
    ("Rex walks to the left.", {"Rex", "Pip"}, True, False, {"Rex"}),  # Pip left out of the watchers
    ("Rex walks to the middle. Pip watches.", {"Rex", "Pip"}, True, True, {"Rex", "Pip"}),
    ("Rex walks to the top.", {"Rex"}, False, False, {"Rex"}),  # no such slot
    ("Rex and Pip meet and say hello. Tiko watches.", {"Rex", "Pip", "Tiko"}, True, True, {"Rex", "Pip", "Tiko"}),
    ("Rex flies to the moon.", {"Rex"}, False, False, {"Rex"}),
])
def test_one_caption_against_the_state_before_it(caption, before, valid, possible, after):
    reading = read_caption(caption, frozenset(before), MEADOW)
    assert (reading.valid, reading.possible, set(reading.on_screen)) == (valid, possible, after)


def test_a_hand_made_story_scores_as_worked_out_by_hand():
    captions = ["Rex is alone in the meadow.", "Pip enters on the left. Rex watches.", "Pip enters on the left. Rex watches.",
                "Rex jumps high. Rex and Rex watch."]
    labels = [{"characters": ["Rex"], "background": "meadow"},
              {"characters": ["Pip", "Rex"], "background": "meadow"},
              {"characters": ["Rex"], "background": "meadow"},  # Pip vanished from the picture
              {"characters": ["Rex"], "background": "night"}]
    judged = judge_story(captions, labels, ["Rex"], "meadow")
    assert judged["valid"] == [True, True, False]
    assert judged["possible"] == [True, False, False]  # Pip cannot enter twice
    assert judged["distinct"] == [True, False, True]
    # step 3: the invalid caption names only Rex; step 2 says {Pip, Rex}, the frame shows {Rex}: F1 2/3
    assert judged["coherence"] == pytest.approx([1.0, 1.0, 2 / 3, 1.0])
    assert judged["background_kept"] == [True, True, True, False]

    other = judge_story(["Pip is alone in the snow.", "Pip waves hello."], [{"characters": ["Pip"], "background": "snow"}] * 2,
                        ["Pip"], "snow")
    summary = summarize([judged, other])
    assert summary["stories"] == 2
    assert summary["valid_captions"] == pytest.approx(3 / 4) and summary["possible_events"] == pytest.approx(2 / 4)
    assert summary["distinct_consecutive"] == pytest.approx(3 / 4)
    assert summary["per_step"]["coherence_f1"] == pytest.approx([1.0, 1.0, 2 / 3, 1.0])
    assert summary["coherence_f1"] == pytest.approx((1.0 + 2 / 3 + 1.0) / 3)
    assert summary["style_background_kept_last"] == 0.0  # only the first story reaches step 3, on another background


def test_distinct_share_of_real_stories():
    assert distinct_share([["a", "b", "b"], ["c", "c"]]) == pytest.approx(1 / 3)
    rng = random.Random(1)
    real = distinct_share([make_story(rng, i)["captions"] for i in range(40)])
    assert 0.5 < real < 1.0  # the world repeats itself sometimes (e.g. a jump after a jump)


def test_the_storyboard_story_is_the_median_by_coherence(tmp_path):
    import json

    from PIL import Image

    from tools import median_story

    coherences = {"story_1": [1.0, 0.2, 0.4], "story_2": [1.0, 1.0, 1.0], "story_3": [1.0, 0.5, 0.7],
                  "story_4": [1.0, 0.0, 0.0], "story_5": [1.0, 0.9, 0.9]}
    for name, coherence in coherences.items():
        folder = tmp_path / name
        folder.mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"frame_{i:02d}.png")
        record = {"captions": ["a", "b", "c"], "frames": [f"frame_{i:02d}.png" for i in range(3)],
                  "judge": {"coherence": coherence}}
        (folder / "story.json").write_text(json.dumps(record))
    (tmp_path / "story_9").mkdir()  # a story without a judgement (no evaluator) is not ranked
    (tmp_path / "story_9" / "story.json").write_text(json.dumps({"captions": [], "frames": []}))
    # generated-step means: 0.3, 1.0, 0.6, 0.0, 0.9 -> sorted 0.0, 0.3, 0.6, 0.9, 1.0: the median is story_3
    score, folder, _ = median_story.median_story(tmp_path)
    assert folder.name == "story_3" and score == pytest.approx(0.6)
    median_story.main([str(tmp_path), "--out", str(tmp_path / "board.png")])
    assert Image.open(tmp_path / "board.png").width == 3 * 16  # three frames at scale 2
    (tmp_path / "story_5" / "story.json").unlink()  # four left: the lower of the two middle ones (0.3, 0.6)
    assert median_story.median_story(tmp_path)[1].name == "story_1"
