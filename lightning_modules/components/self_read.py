"""Self-read, stage 2's training on its own regressions (see ``StoryMLLMModule.self_read``), and the
regressions stage 3's ``read_own`` trains the de-tokenizer on.

A generated story reads back nothing but the model's own regressed features; teacher forcing
alone never shows the model one (exposure bias), so its errors compound from step to step. Here a
pass without gradients regresses every frame of the chunk from the frames before it, and a keyed
share of the frames the trained pass reads (context slots, residual base) are replaced by those
regressions; ``passes`` > 1 regresses again from a context that already holds them (the second
step of a compounding story, and so on). The start frames and the targets stay true.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.components.noise import keyed_uniform, noise_keys


@torch.no_grad()
def replace_with_regressions(model, seq, features: torch.Tensor, feature_index: torch.Tensor, read: torch.Tensor,
                             take: torch.Tensor, passes: int) -> torch.Tensor:
    """``read`` with the target frames marked in ``take`` (one flag per row of ``seq.target_frames``)
    replaced by ``model``'s regression of them, ``passes`` deep: each pass reads the previous one's.

    Stage 2's self-read takes a keyed share of the frames (``read_own_regressions``); stage 3's
    ``read_own`` takes them all, so the last pass reads what a story with the true captions reads.
    """
    rows = feature_index[seq.target_frames[:, 0], seq.target_frames[:, 1]][take.to(feature_index.device)]
    out = read
    for _ in range(passes):
        predicted = model(seq, features, feature_index, out)[1]
        out = read.clone()
        out[rows] = predicted[take.to(predicted.device)].to(out.dtype)
    return out


def read_own_regressions(module, seq, features: torch.Tensor, feature_index: torch.Tensor, read: torch.Tensor | None,
                         batch: dict[str, Any]) -> torch.Tensor:
    """What the trained pass reads: ``read`` (or ``features``) with a share ``module.self_read`` of the
    target frames replaced by the module's regression of them, ``module.self_read_passes`` deep.

    Which frames are replaced is drawn per (step, story, frame), so it does not depend on how the
    batch was split across processes.
    """
    keys = noise_keys(module.global_step, 1, [(batch["story_id"][b], batch["frame_index"][b, f])
                                              for b, f in seq.target_frames.tolist()])
    take = keyed_uniform(keys) < module.self_read
    return replace_with_regressions(module, seq, features, feature_index, features if read is None else read, take,
                                    module.self_read_passes)
