"""What a free-running story keeps of its opening frame, step by step (for ``predict``).

Free continuation has no true frames to compare with; :class:`StartCastRetention` asks the
story evaluator (:mod:`evaluation.evaluator`) which characters and background each generated
frame shows and compares them with the start frame's truth. Every state is a per-step sum
(``dist_reduce_fx="sum"``), so values do not depend on how stories were split across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


class StartCastRetention(Metric):
    """Per story step: how much of the opening frame's cast and background a generated story keeps.

    For free continuation (no true frames to compare with): at step ``k`` (0 = the start frame),
    ``cast`` is the share of the start frame's true characters that the evaluator finds in frame
    ``k``, and ``background`` the share of stories whose frame ``k`` shows the true background.
    Sums per step, so the values do not depend on how stories were split across processes.
    """

    full_state_update = False

    def __init__(self, max_steps: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_steps = max_steps
        for name in ("cast_found", "cast_total", "background_found", "stories"):
            self.add_state(name, default=torch.zeros(max_steps, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, detected_characters: Sequence[Sequence[str]], detected_backgrounds: Sequence[str],  # type: ignore[override]
               start_cast: Sequence[str], background: str) -> None:
        """One story: the evaluator's labels of each of its frames, and the start frame's truth."""
        steps = min(len(detected_characters), self.max_steps)
        for k in range(steps):
            self.cast_found[k] += len(set(start_cast) & set(detected_characters[k]))
            self.cast_total[k] += len(set(start_cast))
            self.background_found[k] += float(detected_backgrounds[k] == background)
            self.stories[k] += 1

    def compute(self) -> dict[str, torch.Tensor]:
        seen = self.stories > 0
        return {
            "cast": (self.cast_found[seen] / self.cast_total[seen].clamp(min=1)).float(),
            "background": (self.background_found[seen] / self.stories[seen]).float(),
            "stories": self.stories[seen].float(),
        }


def retention_table(scores: dict[str, torch.Tensor], steps: Sequence[int] = (0, 1, 2, 3, 5, 10, 15, 20, 25)) -> str:
    """Markdown rows of :class:`StartCastRetention` at the given steps (those the stories reached)."""
    rows = ["| step | start cast found | background kept | stories |", "|---|---|---|---|"]
    for k in steps:
        if k < len(scores["cast"]):
            rows.append(f"| {k} | {float(scores['cast'][k]):.3f} | {float(scores['background'][k]):.3f} | {int(scores['stories'][k])} |")
    return "\n".join(rows)
