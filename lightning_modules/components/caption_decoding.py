"""How the next caption token is picked: greedy by default, temperature + nucleus sampling optional.

The decoding loop itself is :meth:`~lightning_modules.components.story_generator.StoryGenerator.decode_caption`
(one loop for generation and for evaluation).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch


@dataclass
class DecodeSettings:
    max_new_tokens: int = 40
    min_new_tokens: int = 0  # stop tokens are masked until this many (benchmarks: fixed work per step)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def pick_token(
    logits: torch.Tensor,
    settings: DecodeSettings,
    generator: torch.Generator | None = None,
    banned: Collection[int] = (),
) -> int:
    """Greedy, or temperature + nucleus sampling (reproducible with ``generator``); never a ``banned`` id."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if settings.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < settings.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
