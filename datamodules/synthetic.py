"""A deterministic synthetic world in the exact StoryStream jsonl format.

Every story has a cast of 1-3 named characters and one background style. Each of its 30
frames shows the world *after* one event (a character enters, leaves, moves, jumps, meets
another, waves or sits), and its caption names the event and every character on screen. What
a frame shows follows from the frame before and its caption: a caption names the slot where a
character enters or walks to, and a story's scenery (where its stars or flowers are) stays put.
Each record also carries ground truth (``characters`` per frame, ``background``) so that
character and style consistency of generated stories can be scored.

    python -m datamodules.synthetic --out data/synthetic --stories 2000 --seed 0 --size 64

Writes ``OUT/images/story_XXXXX/frame_YY.png``, ``OUT/{train,val,test}.jsonl`` whose image
paths are relative to ``OUT/images``, and ``OUT/world.json`` (the settings, which the data module
checks a config against). The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from datamodules.synthetic_world import BACKGROUNDS, CHARACTER_NAMES, SLOTS, Actor, Background, render_frame

FRAMES_PER_STORY = 30
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _names(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _where(slot: int, entering: bool = False) -> str:
    """The phrase that names a slot: "on the left" where one enters, "to the left" where one walks."""
    side = "left" if SLOTS[slot] < 0.5 else "right" if SLOTS[slot] > 0.5 else "middle"
    if side == "middle":
        return "in the middle" if entering else "to the middle"
    return f"{'on' if entering else 'to'} the {side}"


class StoryWriter:
    """Simulates one story: a sequence of (event caption, actors on screen) states."""

    def __init__(self, rng: random.Random, cast: list[str], background: Background):
        self.rng = rng
        self.cast = cast
        self.background = background
        self.on_screen: list[Actor] = []

    def _free_slots(self) -> list[int]:
        taken = {a.slot for a in self.on_screen}
        return [s for s in range(len(SLOTS)) if s not in taken]

    def _absent(self) -> list[str]:
        present = {a.name for a in self.on_screen}
        return [n for n in self.cast if n not in present]

    def opening(self) -> str:
        first = self.rng.choice(self.cast)
        self.on_screen = [Actor(first, self.rng.randrange(len(SLOTS)))]
        return f"{first} is alone {self.background.place}."

    def step(self) -> str:
        for actor in self.on_screen:
            actor.jumping = False
        events = ["move", "jump", "wave", "sit"]
        if self._absent() and self._free_slots():
            events += ["enter", "enter"]
        if len(self.on_screen) > 1:
            events += ["leave", "meet"]
        event = self.rng.choice(events)
        return getattr(self, f"_{event}")()

    def _with_others(self, actor: Actor, sentence: str) -> str:
        others = [a.name for a in self.on_screen if a is not actor]
        if others:
            return f"{sentence} {_names(others)} {'watches' if len(others) == 1 else 'watch'}."
        return sentence

    def _enter(self) -> str:
        name = self.rng.choice(self._absent())
        slot = self.rng.choice(self._free_slots())
        actor = Actor(name, slot)
        self.on_screen.append(actor)
        return self._with_others(actor, f"{name} enters {_where(slot, entering=True)}.")

    def _leave(self) -> str:
        actor = self.rng.choice(self.on_screen)
        self.on_screen.remove(actor)
        stayers = _names([a.name for a in self.on_screen])
        verb = "stays" if len(self.on_screen) == 1 else "stay"
        return f"{actor.name} leaves and {stayers} {verb} {self.background.place}."

    def _move(self) -> str:
        actor = self.rng.choice(self.on_screen)
        free = self._free_slots()
        if not free:
            return self._jump()
        target = self.rng.choice(free)
        actor.slot, actor.sitting = target, False
        # the caption names the slot itself, not a direction: "to the right" from the left slot
        # could be the middle or the right, and a frame the caption leaves open is one the model can
        # only draw as the average of both (a ghost in each place)
        return self._with_others(actor, f"{actor.name} walks {_where(target)}.")

    def _jump(self) -> str:
        actor = self.rng.choice(self.on_screen)
        actor.jumping, actor.sitting = True, False
        return self._with_others(actor, f"{actor.name} jumps high.")

    def _wave(self) -> str:
        actor = self.rng.choice(self.on_screen)
        actor.sitting = False
        return self._with_others(actor, f"{actor.name} waves hello.")

    def _sit(self) -> str:
        actor = self.rng.choice(self.on_screen)
        actor.sitting = True
        return self._with_others(actor, f"{actor.name} sits down to rest.")

    def _meet(self) -> str:
        a, b = self.rng.sample(self.on_screen, 2)
        # b walks next to a when it stands farther off and the slot between them is free; who goes
        # where follows from the frame before, so the caption need not say it
        between = (a.slot + b.slot) // 2
        if abs(a.slot - b.slot) > 1 and between in self._free_slots():
            b.slot = between
        a.sitting = b.sitting = False
        rest = [x.name for x in self.on_screen if x is not a and x is not b]
        sentence = f"{a.name} and {b.name} meet and say hello."
        if rest:
            sentence += f" {_names(rest)} {'watches' if len(rest) == 1 else 'watch'}."
        return sentence


def make_story(rng: random.Random, index: int) -> dict:
    """One story's captions, per-frame actors and ground truth (no pixels yet)."""
    cast = rng.sample(CHARACTER_NAMES, rng.randint(1, 3))
    background = rng.choice(BACKGROUNDS)
    writer = StoryWriter(rng, cast, background)
    captions, states = [writer.opening()], []
    states.append([Actor(a.name, a.slot, a.jumping, a.sitting) for a in writer.on_screen])
    while len(captions) < FRAMES_PER_STORY:
        captions.append(writer.step())
        states.append([Actor(a.name, a.slot, a.jumping, a.sitting) for a in writer.on_screen])
    return {"index": index, "cast": cast, "background": background, "captions": captions, "states": states}


def parse_size(text: str) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"48x80"`` -> (48, 80) as (height, width)."""
    if "x" in text:
        h, w = text.lower().split("x")
        return int(h), int(w)
    return int(text), int(text)


def split_of(index: int, n_stories: int) -> str:
    n_train = round(n_stories * SPLIT_FRACTIONS["train"])
    n_val = round(n_stories * SPLIT_FRACTIONS["val"])
    if index < n_train:
        return "train"
    return "val" if index < n_train + n_val else "test"


WORLD_FILE = "world.json"  # the settings a world was made with, beside its splits


def world_settings(stories: int, seed: int, size: tuple[int, int]) -> dict:
    return {"stories": stories, "seed": seed, "size": list(size)}


def generate(out: Path | str, stories: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> dict[str, Path]:
    """Write the synthetic world to ``out`` (and its settings to ``WORLD_FILE``); return the paths of
    the three jsonl splits."""
    out = Path(out)
    image_root = out / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines: dict[str, list[str]] = {name: [] for name in SPLIT_FRACTIONS}
    for index in range(stories):
        story = make_story(rng, index)
        folder = f"story_{index:05d}"
        (image_root / folder).mkdir(exist_ok=True)
        images = []
        for frame, actors in enumerate(story["states"]):
            rel = f"{folder}/frame_{frame:02d}.png"
            render_frame(story["background"], actors, size, variant=index).save(
                image_root / rel, optimize=False
            )
            images.append(rel)
        record = {
            "id": index,
            "images": images,
            "captions": story["captions"],
            "orders": list(range(FRAMES_PER_STORY)),
            "characters": [sorted(a.name for a in actors) for actors in story["states"]],
            "background": story["background"].name,
            "cast": sorted(story["cast"]),
        }
        lines[split_of(index, stories)].append(json.dumps(record))
    paths = {}
    for split, records in lines.items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(line + "\n" for line in records))
    (out / WORLD_FILE).write_text(json.dumps(world_settings(stories, seed, size)))
    return paths


def contact_sheet(jsonl: Path, image_root: Path, stories: int = 4, frames: int = 10, scale: int = 2) -> Image.Image:
    """A grid with one row per story (its first ``frames`` frames), for eyeballing the world."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines()[:stories]]
    first = Image.open(Path(image_root) / rows[0]["images"][0])
    w, h = first.size[0] * scale, first.size[1] * scale
    sheet = Image.new("RGB", (w * frames, h * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, rel in enumerate(row["images"][:frames]):
            frame = Image.open(Path(image_root) / rel).convert("RGB").resize((w, h), Image.Resampling.NEAREST)
            sheet.paste(frame, (c * w, r * h))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--stories", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=parse_size, default=(64, 64), help="64 or HxW, e.g. 48x80")
    parser.add_argument("--contact-sheet", type=Path, help="also save a PNG grid of a few val stories here")
    args = parser.parse_args(argv)
    paths = generate(args.out, args.stories, args.seed, args.size)
    for split, path in paths.items():
        n = sum(1 for _ in path.open())
        print(f"{split}: {n} stories -> {path}")
    if args.contact_sheet:
        contact_sheet(paths["train"], args.out / "images").save(args.contact_sheet)
        print(f"contact sheet -> {args.contact_sheet}")


if __name__ == "__main__":
    main()
