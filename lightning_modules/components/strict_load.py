"""Loading released weights strictly: every missing, unexpected or misshapen tensor is named.

``load_state_dict(strict=True)`` already refuses a mismatch; this says, before anything is
copied, which names and shapes differ and in which file, so a wrong file or a wrong config is
fixed from the message alone. Nothing here uses ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """Lines naming what differs between two state dicts (empty: they match by name and shape)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: {tuple(given[k].shape)} given, {tuple(expected[k].shape)} expected"
             for k in sorted(set(given) & set(expected)) if tuple(given[k].shape) != tuple(expected[k].shape)]
    lines = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            lines.append(f"{label} ({len(names)}): {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}")
    return lines


def load_strictly(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state, strict=True)``, failing first with every difference named."""
    problems = state_mismatch(module.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(dict(state), strict=True)
