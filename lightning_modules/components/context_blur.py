"""Context blur, stage 2's augmentation of what the MLLM reads (see ``StoryMLLMModule.context_blur``).

Generation reads back its own regressed features, which regression to the mean has blurred (a
character half-faded where it might have moved). Training on frames pulled toward their story's
mean teaches the model to restore them instead of fading a little more at every step. Only the
frames the model reads are blurred (context slots, residual base); the targets stay sharp.

The frames are ViT features, computed in the module from the frozen tower, so the blur is applied
there; each share is keyed by (step, story, frame), so it does not depend on how the batch was
split across processes or workers.
"""

from __future__ import annotations

import torch

from lightning_modules.components.noise import keyed_uniform, noise_keys


def blur_toward_story_mean(features: torch.Tensor, feature_index: torch.Tensor, story_ids: list[str],
                           frame_index: torch.Tensor, max_share: float, seed: int) -> torch.Tensor:
    """``features`` rows pulled toward the mean of their story chunk by a share in ``[0, max_share]``.

    The share of each frame is keyed by (seed, story, frame), so it does not depend on how the
    batch was split across processes.
    """
    out = features.clone()
    for b, story in enumerate(story_ids):
        frames = (feature_index[b] >= 0).nonzero().flatten()
        rows = feature_index[b, frames]
        mean = features[rows].mean(0, keepdim=True)
        keys = noise_keys(seed, 0, [(story, frame_index[b, f]) for f in frames])
        share = keyed_uniform(keys) * max_share
        share = share.to(features.device, features.dtype)[:, None, None]
        out[rows] = features[rows] * (1 - share) + mean * share
    return out
