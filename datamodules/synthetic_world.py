"""The synthetic world's cast, scenery and look: who exists, where they stand, and how a frame is drawn.

:mod:`datamodules.synthetic` writes stories in this world; the evaluator's label names come from here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw


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
BACKGROUND_BY_NAME = {b.name: b for b in BACKGROUNDS}

# Characters stand in one of these horizontal slots (fractions of the width).
SLOTS = (0.18, 0.5, 0.82)


@dataclass
class Actor:
    name: str
    slot: int
    jumping: bool = False
    sitting: bool = False


def render_frame(
    background: Background, actors: list[Actor], size: tuple[int, int], variant: int
) -> Image.Image:
    """Draw one frame. ``variant`` places the scenery's details (stars, flowers, ...): one per story."""
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
    rng = random.Random(variant * 7919 + len(bg.name))  # same variant, same bytes
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
