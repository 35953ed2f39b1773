"""Where image bytes come from, and the two views every frame is turned into."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from datamodules import records

# The CLIP statistics that CLIP / SigLIP / Qwen-VL ViTs are trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class UnreadableImage(Exception):
    """Raised by an image store with the skip kind that explains why."""

    def __init__(self, kind: str, ref: str, detail: str = ""):
        super().__init__(f"{kind}: {ref} {detail}".strip())
        self.kind = kind


class ImageStore(Protocol):
    def read(self, ref: str) -> bytes: ...


@dataclass
class FileStore:
    """Images as files under a root directory (the StoryStream layout)."""

    root: str

    def path(self, ref: str) -> str:
        return os.path.join(self.root, ref)

    def read(self, ref: str) -> bytes:
        path = self.path(ref)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except IsADirectoryError as err:
            raise UnreadableImage(records.NOT_A_FILE, path) from err
        except OSError as err:
            raise UnreadableImage(records.MISSING_IMAGE, path, str(err)) from err


@dataclass
class TarStore:
    """Images inside webdataset tar shards, read by offset (see :mod:`datamodules.shards`)."""

    members: dict[str, tuple[str, int, int]]  # ref -> (tar path, data offset, size)

    def read(self, ref: str) -> bytes:
        path, offset, size = self.members[ref]
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)


def decode_rgb(data: bytes, ref: str) -> Image.Image:
    """Decode fully (so truncation is caught here, not in a transform later)."""
    if not data:
        raise UnreadableImage(records.EMPTY_IMAGE, ref)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(records.UNREADABLE_IMAGE, ref, str(err)) from err


@dataclass
class FrameViews:
    """Turns a PIL frame into the ViT view and the diffusion view (with SD-XL size conditioning).

    ``image_size`` is (height, width) of the diffusion view: the frame is resized keeping its
    aspect ratio until it covers that size, then cropped (centre, or random with ``rng``).
    """

    vit_size: int = 224
    image_size: tuple[int, int] = (64, 64)
    random_crop: bool = False

    def __post_init__(self) -> None:
        self._mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def vit_view(self, image: Image.Image) -> torch.Tensor:
        resized = image.resize((self.vit_size, self.vit_size), Image.Resampling.BICUBIC)
        return (pil_to_tensor(resized).float() / 255.0 - self._mean) / self._std

    def diffusion_view(self, image: Image.Image, rng: np.random.Generator | None = None) -> dict:
        target_h, target_w = self.image_size
        width, height = image.size
        scale = max(target_h / height, target_w / width)
        new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC) if (new_w, new_h) != (width, height) else image
        if self.random_crop and rng is not None:
            top = int(rng.integers(0, new_h - target_h + 1))
            left = int(rng.integers(0, new_w - target_w + 1))
        else:
            top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
        cropped = resized.crop((left, top, left + target_w, top + target_h))
        return {
            "pixels": pil_to_tensor(cropped).float() / 127.5 - 1.0,
            "original_size": (height, width),
            "crop_top_left": (top, left),
            "target_size": (target_h, target_w),
        }

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> dict:
        return {"vit_pixels": self.vit_view(image), **self.diffusion_view(image, rng)}
