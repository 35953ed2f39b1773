"""The typical story of a ``predict`` run, as a picture: the median by the judge's coherence.

    python -m tools.median_story runs/tiny_stories --out docs/quickstart_storyboard.png

Reads every ``story_*/story.json`` that ``predict`` judged (the synthetic world, with
``evaluator_dir``), ranks the stories by coherence (the characters each caption puts on screen
against those the evaluator finds, averaged over the generated steps), takes the median one (the
lower of the two middle ones for an even count) and draws it with its captions. The ranking is
printed, so the choice can be checked; the README's storyboard is made this way, never picked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from lightning_modules.components.storyboard import story_strip


def story_coherence(record: dict) -> float:
    """Mean coherence F1 over the generated steps (step 0 is the start frame, not generated)."""
    steps = record["judge"]["coherence"][1:]
    return sum(steps) / len(steps) if steps else float("nan")


def rank_stories(folder: Path) -> list[tuple[float, Path, dict]]:
    """(coherence, story folder, story.json) of every judged story under ``folder``, lowest first."""
    judged = []
    for path in sorted(folder.glob("story_*/story.json")):
        record = json.loads(path.read_text())
        if "judge" in record:
            judged.append((story_coherence(record), path.parent, record))
    if not judged:
        raise FileNotFoundError(f"{folder}: no judged story_*/story.json; run predict with an evaluator_dir on the synthetic world")
    return sorted(judged, key=lambda item: (item[0], item[1].name))


def median_story(folder: Path) -> tuple[float, Path, dict]:
    ranked = rank_stories(folder)
    return ranked[(len(ranked) - 1) // 2]


def draw(story: Path, record: dict, columns: int = 13) -> Image.Image:
    frames = [Image.open(story / name).convert("RGB") if name else None for name in record["frames"]]
    return story_strip(record["captions"], frames, scale=2, columns=columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stories", type=Path, help="a predict output_dir (story_*/ folders)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    ranked = rank_stories(args.stories)
    score, story, record = ranked[(len(ranked) - 1) // 2]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(story, record).save(args.out)
    print("stories by coherence: " + ", ".join(f"{p.name} {s:.3f}" for s, p, _ in ranked))
    print(f"median: {story.name} (coherence {score:.3f}) -> {args.out}")


if __name__ == "__main__":
    main()
