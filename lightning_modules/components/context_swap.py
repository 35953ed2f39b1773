"""Context swap, stage 2's augmentation for keep-or-code stories (see ``StoryMLLMModule.context_swap``).

A keep-or-code story reads back its own decoded frames. Where one goes wrong (a character erased, a
second copy of one where another stood), keep keeps the error, and a model taught only on true
frames never learned to mend one: the caption says "Fern watches", the frame has lost Fern, and
every later frame keeps her lost. Here a keyed share of the frames the model reads (context slots
and the frame being edited) has one rectangle of its token grid replaced by the same rectangle of
another frame of its story chunk, centred on a token where the two frames differ: the same
background, a character erased, moved or doubled. The targets stay true, so the next step's labels
code the rectangle back to what the story says is there.

The choices of each frame are keyed by (seed, step, story, frame), so they do not depend on how the
batch was split across processes or workers.
"""

from __future__ import annotations

import math

import torch

from lightning_modules.components.noise import sample_key


def token_grid_side(num_tokens: int) -> int:
    """The side of the square token grid of ``num_tokens`` tokens (raises if they are not a square)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"context_swap needs a square grid of visual tokens; the tokenizer gives {num_tokens}")
    return side


def swap_regions_within_story(features: torch.Tensor, feature_index: torch.Tensor, story_ids: list[str],
                              frame_index: torch.Tensor, share: float, seed: int, step: int) -> torch.Tensor:
    """``features (rows, N, D)`` where a share ``share`` of each story chunk's frames has one rectangle
    (sides 1 to half the grid) replaced by the same rectangle of another frame of its chunk."""
    side = token_grid_side(features.shape[1])
    out = features.clone()
    for b, story in enumerate(story_ids):
        positions = (feature_index[b] >= 0).nonzero().flatten()
        rows = feature_index[b][positions].tolist()
        if len(rows) < 2:  # nothing in the chunk to take a rectangle from
            continue
        for i, (row, position) in enumerate(zip(rows, positions)):
            draw = torch.Generator().manual_seed(sample_key(seed, step, story, int(frame_index[b, position])))
            if torch.rand((), generator=draw).item() >= share:
                continue
            other = rows[(i + 1 + int(torch.randint(len(rows) - 1, (), generator=draw))) % len(rows)]
            differs = (features[row] != features[other]).any(-1).nonzero().flatten()
            if len(differs) == 0:
                continue
            centre = int(differs[torch.randint(len(differs), (), generator=draw)])
            height, width = (int(v) for v in torch.randint(1, side // 2 + 1, (2,), generator=draw))
            top = min(max(centre // side - height // 2, 0), side - height)
            left = min(max(centre % side - width // 2, 0), side - width)
            grid = out[row].view(side, side, -1)
            grid[top : top + height, left : left + width] = features[other].view(side, side, -1)[top : top + height, left : left + width]
    return out
