"""The story evaluation protocol, shared by the validation callback, ``train.py test`` and the tools.

Protocol (StoryDALL-E / StoryGPT-V, "visualization"): start from a story's first frame and
caption, give the true captions of the next ``steps`` frames, let the model draw them, and
compare the drawn frames with the true ones (FID, CLIP-I, CLIP-T, character F1, frame and
background accuracy, within-story consistency) with :class:`evaluation.story_metrics.StoryMetrics`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evaluation.story_metrics import StoryMetrics


def images_of(story) -> torch.Tensor:
    """The generated (not given) frames of a story, stacked (n, 3, H, W) in [-1, 1].

    ``story`` is a :class:`lightning_modules.components.story_generator.Story` (anything whose
    ``steps`` have ``image`` and ``given``).
    """
    return torch.stack([s.image for s in story.steps if not s.given])


def score_story(pl_module, metrics: StoryMetrics, frames: dict[str, Any], start_frames: int = 1, settings=None) -> bool:
    """Generate the frames after ``start_frames`` with their true captions and update ``metrics``.

    Returns False (and scores nothing) when the story has no frame after its start frames.
    """
    k = start_frames
    if len(frames["captions"]) <= k:
        return False
    story = pl_module.generate_story(frames["vit_pixels"][:k], frames["captions"][:k], frames["pixels"][:k],
                                     given_captions=frames["captions"][k:], settings=settings)
    generated = images_of(story).to(pl_module.device)
    n = len(generated)
    truth = frames["pixels"][k : k + n].to(pl_module.device)
    characters = frames["characters"][k : k + n] if frames["characters"] else None
    metrics.update(generated, truth, frames["captions"][k : k + n], characters, [frames["background"]] * n,
                   [frames["story_id"]] * n)
    return True


def rank_share(total: int, rank: int, world_size: int) -> list[int]:
    """Story indices ``rank`` scores: ``rank, rank + world_size, ...``, padded with -1 so that every
    rank gets ``ceil(total / world_size)`` entries."""
    mine = list(range(rank, total, world_size))
    return mine + [-1] * (-(-total // world_size) - len(mine))


def metric_table(scores: dict[str, float]) -> str:
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in sorted(scores.items()))])


def write_metrics(folder: str | Path, scores: dict[str, float], info: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.json"
    path.write_text(json.dumps({"metrics": scores, **info}, indent=2, default=str))
    return path
