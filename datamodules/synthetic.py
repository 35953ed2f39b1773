"""A deterministic synthetic world in the exact StoryStream jsonl format.

Every story has a cast of 1-3 named characters and one background style. Each of its 30
frames shows the world *after* one event (a character enters, leaves, moves, jumps, meets
another, waves or sits), and its caption names the event and every character on screen.
Each record also carries ground truth (``characters`` per frame, ``background``) so that
character and style consistency of generated stories can be scored.

    python -m datamodules.synthetic --out data/synthetic --stories 400 --seed 0 --size 64

Writes ``OUT/images/story_XXXXX/frame_YY.png`` and ``OUT/{train,val,test}.jsonl`` whose image
paths are relative to ``OUT/images``. The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

FRAMES_PER_STORY = 30
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass(frozen=True)
class Character:
    name: str
    shape: str  # body outline
    color: tuple[int, int, int]
    mark: str  # distinguishing mark drawn on or above the body


CHARACTERS: tuple[Character, ...] = (
    Character("Bolt", "circle", (230, 40, 40), "hat"),
    Character("Pip", "square", (40, 110, 230), "stripe"),
    Character("Mira", "triangle", (250, 200, 0), "dot"),
    Character("Zed", "diamond", (140, 40, 200), "antenna"),
    Character("Luna", "hexagon", (240, 240, 240), "eye"),
    Character("Rex", "star", (250, 120, 0), "belt"),
    Character("Tiko", "cross", (20, 20, 20), "crown"),
    Character("Fern", "pill", (40, 190, 60), "bow"),
    Character("Olli", "arch", (0, 200, 200), "spots"),
    Character("Nox", "oval", (255, 110, 200), "ears"),
)
CHARACTER_NAMES = tuple(c.name for c in CHARACTERS)
_BY_NAME = {c.name: c for c in CHARACTERS}


@dataclass(frozen=True)
class Background:
    name: str
    place: str  # the phrase captions use ("in the meadow")
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    detail: str  # what is scattered on it


BACKGROUNDS: tuple[Background, ...] = (
    Background("meadow", "in the meadow", (150, 210, 250), (90, 170, 60), "flowers"),
    Background("night", "under the night sky", (15, 20, 60), (40, 40, 70), "stars"),
    Background("desert", "in the desert", (250, 220, 160), (220, 180, 100), "sun"),
    Background("ocean", "by the ocean", (120, 190, 240), (20, 80, 170), "waves"),
    Background("forest", "in the forest", (170, 210, 170), (60, 100, 40), "trees"),
    Background("snow", "in the snow", (210, 220, 235), (250, 250, 250), "flakes"),
    Background("city", "in the city", (180, 180, 190), (90, 90, 100), "buildings"),
    Background("cave", "in the cave", (70, 50, 40), (110, 80, 60), "rocks"),
)
BACKGROUND_NAMES = tuple(b.name for b in BACKGROUNDS)
_BACKGROUND_BY_NAME = {b.name: b for b in BACKGROUNDS}

# Characters stand in one of these horizontal slots (fractions of the width).
SLOTS = (0.18, 0.5, 0.82)


@dataclass
class Actor:
    name: str
    slot: int
    jumping: bool = False
    sitting: bool = False


def _names(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


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
        where = "on the left" if SLOTS[slot] < 0.5 else "on the right" if SLOTS[slot] > 0.5 else "in the middle"
        return self._with_others(actor, f"{name} enters {where}.")

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
        direction = "right" if target > actor.slot else "left"
        actor.slot, actor.sitting = target, False
        return self._with_others(actor, f"{actor.name} walks to the {direction}.")

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
        # b walks next to a when a neighbouring slot is free; either way they meet.
        near = [s for s in self._free_slots() if abs(s - a.slot) == 1]
        if near:
            b.slot = self.rng.choice(near)
        a.sitting = b.sitting = False
        rest = [x.name for x in self.on_screen if x is not a and x is not b]
        sentence = f"{a.name} and {b.name} meet and say hello."
        if rest:
            sentence += f" {_names(rest)} {'watches' if len(rest) == 1 else 'watch'}."
        return sentence


def render_frame(
    background: Background, actors: list[Actor], size: tuple[int, int], variant: int
) -> Image.Image:
    """Draw one frame. ``variant`` jitters the scenery so frames of a story are not identical."""
    height, width = size
    image = Image.new("RGB", (width, height), background.sky)
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)
    draw.rectangle([0, horizon, width, height], fill=background.ground)
    _draw_detail(draw, background, width, height, horizon, variant)
    for actor in sorted(actors, key=lambda a: a.slot):
        _draw_character(draw, _BY_NAME[actor.name], actor, width, height, horizon)
    return image


def _draw_detail(draw: ImageDraw.ImageDraw, bg: Background, w: int, h: int, horizon: int, variant: int) -> None:
    rng = random.Random(variant * 7919 + len(bg.name))  # fixed per frame: same seed, same bytes
    unit = max(1, min(w, h) // 32)
    if bg.detail == "sun":
        draw.ellipse([w * 0.72, h * 0.06, w * 0.92, h * 0.06 + w * 0.2], fill=(255, 240, 60))
    elif bg.detail == "stars":
        for _ in range(6):
            x, y = rng.random() * w, rng.random() * horizon * 0.8
            draw.rectangle([x, y, x + unit, y + unit], fill=(255, 255, 200))
    elif bg.detail == "flowers":
        for _ in range(5):
            x, y = rng.random() * w, horizon + rng.random() * (h - horizon) * 0.3
            draw.ellipse([x, y, x + 2 * unit, y + 2 * unit], fill=(250, 80, 160))
    elif bg.detail == "waves":
        for i in range(4):
            y = horizon + (i + 0.5) * (h - horizon) / 4
            draw.line([0, y, w, y], fill=(200, 230, 255), width=unit)
    elif bg.detail == "trees":
        for x in (0.05, 0.32, 0.62, 0.9):
            cx = w * x
            draw.polygon([(cx - 4 * unit, horizon), (cx + 4 * unit, horizon), (cx, h * 0.2)], fill=(30, 80, 30))
    elif bg.detail == "flakes":
        for _ in range(8):
            x, y = rng.random() * w, rng.random() * horizon
            draw.ellipse([x, y, x + unit, y + unit], fill=(255, 255, 255))
    elif bg.detail == "buildings":
        for i, x in enumerate((0.0, 0.22, 0.5, 0.75)):
            top = h * (0.15 + 0.1 * (i % 2))
            draw.rectangle([w * x, top, w * x + w * 0.18, horizon], fill=(60, 60, 75))
    elif bg.detail == "rocks":
        draw.polygon([(0, 0), (w, 0), (w, h * 0.12), (w * 0.5, h * 0.2), (0, h * 0.12)], fill=(40, 30, 25))
        for _ in range(3):
            x = rng.random() * w
            draw.ellipse([x, h - 4 * unit, x + 5 * unit, h], fill=(80, 70, 60))


def _draw_character(
    draw: ImageDraw.ImageDraw, c: Character, actor: Actor, w: int, h: int, horizon: int
) -> None:
    body = min(w, h) * 0.24
    cx = SLOTS[actor.slot] * w
    bottom = horizon + (h - horizon) * 0.55
    if actor.jumping:
        bottom -= h * 0.22
    scale_y = 0.7 if actor.sitting else 1.0
    top = bottom - body * scale_y
    left, right = cx - body / 2, cx + body / 2
    box = [left, top, right, bottom]
    fill = c.color
    outline = (0, 0, 0) if sum(fill) > 150 else (255, 255, 255)
    if c.shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline)
    elif c.shape == "square":
        draw.rectangle(box, fill=fill, outline=outline)
    elif c.shape == "triangle":
        draw.polygon([(left, bottom), (right, bottom), (cx, top)], fill=fill, outline=outline)
    elif c.shape == "diamond":
        cy = (top + bottom) / 2
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill, outline=outline)
    elif c.shape == "hexagon":
        cy, q = (top + bottom) / 2, body / 4
        draw.polygon(
            [(left + q, top), (right - q, top), (right, cy), (right - q, bottom), (left + q, bottom), (left, cy)],
            fill=fill,
            outline=outline,
        )
    elif c.shape == "star":
        cy, r = (top + bottom) / 2, body / 2
        pts = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) * scale_y))
        draw.polygon(pts, fill=fill, outline=outline)
    elif c.shape == "cross":
        t = body / 3
        draw.rectangle([cx - t / 2, top, cx + t / 2, bottom], fill=fill)
        cy = (top + bottom) / 2
        draw.rectangle([left, cy - t / 2 * scale_y, right, cy + t / 2 * scale_y], fill=fill)
    elif c.shape == "pill":
        draw.rounded_rectangle([cx - body / 3, top, cx + body / 3, bottom], radius=body / 3, fill=fill, outline=outline)
    elif c.shape == "arch":
        draw.pieslice([left, top, right, bottom + (bottom - top)], 180, 360, fill=fill, outline=outline)
    elif c.shape == "oval":
        draw.ellipse([cx - body / 3, top, cx + body / 3, bottom], fill=fill, outline=outline)
    _draw_mark(draw, c.mark, cx, top, bottom, body)


def _draw_mark(draw: ImageDraw.ImageDraw, mark: str, cx: float, top: float, bottom: float, body: float) -> None:
    u = body / 8
    cy = (top + bottom) / 2
    if mark == "hat":
        draw.rectangle([cx - 2.5 * u, top - 2 * u, cx + 2.5 * u, top], fill=(20, 20, 20))
    elif mark == "stripe":
        draw.rectangle([cx - 4 * u, cy - u, cx + 4 * u, cy + u], fill=(255, 255, 255))
    elif mark == "dot":
        draw.ellipse([cx - 1.5 * u, cy, cx + 1.5 * u, cy + 3 * u], fill=(200, 0, 0))
    elif mark == "antenna":
        draw.line([cx, top, cx, top - 3 * u], fill=(255, 255, 0), width=max(1, int(u)))
        draw.ellipse([cx - u, top - 4 * u, cx + u, top - 2 * u], fill=(255, 255, 0))
    elif mark == "eye":
        draw.ellipse([cx - 2 * u, cy - 2 * u, cx + 2 * u, cy + 2 * u], fill=(0, 0, 0))
    elif mark == "belt":
        draw.rectangle([cx - 3 * u, cy + u, cx + 3 * u, cy + 2.5 * u], fill=(90, 40, 0))
    elif mark == "crown":
        draw.polygon(
            [(cx - 2.5 * u, top), (cx + 2.5 * u, top), (cx + 2.5 * u, top - 3 * u), (cx, top - 1.5 * u), (cx - 2.5 * u, top - 3 * u)],
            fill=(255, 215, 0),
        )
    elif mark == "bow":
        draw.polygon([(cx - 3 * u, top - 2 * u), (cx, top), (cx - 3 * u, top + 2 * u)], fill=(255, 0, 120))
        draw.polygon([(cx + 3 * u, top - 2 * u), (cx, top), (cx + 3 * u, top + 2 * u)], fill=(255, 0, 120))
    elif mark == "spots":
        for dx in (-2, 1.5):
            draw.ellipse([cx + dx * u, cy - u, cx + (dx + 1.5) * u, cy + 0.5 * u], fill=(0, 90, 90))
    elif mark == "ears":
        draw.polygon([(cx - 3 * u, top + u), (cx - u, top + u), (cx - 2.5 * u, top - 3 * u)], fill=(255, 110, 200))
        draw.polygon([(cx + 3 * u, top + u), (cx + u, top + u), (cx + 2.5 * u, top - 3 * u)], fill=(255, 110, 200))


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


def generate(out: Path | str, stories: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> dict[str, Path]:
    """Write the synthetic world to ``out``; return the paths of the three jsonl splits."""
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
            render_frame(story["background"], actors, size, variant=index * 100 + frame).save(
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
