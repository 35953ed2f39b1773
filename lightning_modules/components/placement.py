"""Where the networks of story generation live while a story is written and drawn.

Generating a story at real scale needs the MLLM (Llama-2-7b + ViT-G, ~17 GB in bf16) and the
de-tokenizer (SD-XL UNet + VAE, ~5 GB) plus their activations and the KV cache: more than a
24 GB GPU holds at once. With ``offload``, only the part that works is on the execution device;
the other waits in CPU memory. The story generator asks for
a part before each phase (:meth:`Placement.use`) and, when the drawn images do not feed the
story back (``reencode_images`` off), writes the whole story before drawing it, so each part
moves once per story instead of twice per step. Without ``offload`` :meth:`use` does nothing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class Placement:
    """Moves named parts between ``device`` and CPU memory so that one at a time is on ``device``.

    Args:
        parts: the networks by name (e.g. ``{"mllm": ..., "detokenizer": ...}``); None entries are skipped.
        device: the execution device.
        offload: False leaves every part where it is (the plain path).
    """

    def __init__(self, parts: dict[str, nn.Module | None], device: torch.device | str, offload: bool = False):
        self.parts = {name: part for name, part in parts.items() if part is not None}
        self.device = torch.device(device)
        self.offload = offload
        self.on_device: str | None = None
        self.moves: list[tuple[str, str]] = []  # (part, "device" | "cpu"), in order: what the tests read
        if offload and any(type(p).__name__ == "DTensor" for part in self.parts.values() for p in part.parameters()):
            raise ValueError("generation.offload moves whole networks between devices; a sharded (FSDP) model "
                             "is already spread over the GPUs: turn offload off")

    def use(self, name: str) -> None:
        """``name`` on the execution device; with ``offload``, every other part in CPU memory first."""
        if not self.offload or self.on_device == name:
            return
        for other, part in self.parts.items():
            if other != name and _device_of(part).type != "cpu":
                _move(part, torch.device("cpu"))
                self.moves.append((other, "cpu"))
        if not _same_device(_device_of(self.parts[name]), self.device):
            _move(self.parts[name], self.device)
            self.moves.append((name, "device"))
        self.on_device = name


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` names the current GPU: it is the same device as ``cuda:0`` when that is current."""
    if a.type != b.type:
        return False
    if a.index is None and b.index is None:
        return True
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _move(module: nn.Module, device: torch.device) -> None:
    module.to(device)
    log.debug("placement: %s on %s", type(module).__name__, device)
