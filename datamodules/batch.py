"""The batch contract shared by every stage: one place that says what each key means.

Both modes produce plain dicts. Tensors are batched; text and ground truth stay Python lists.

``mode="frames"`` (stage 1), one frame per sample, ``B`` samples:

==================  =====================  ==========================================================
key                 shape / type           meaning
==================  =====================  ==========================================================
``vit_pixels``      float (B, 3, Hv, Wv)   ViT view: resized (no aspect keep), CLIP mean/std
``pixels``          float (B, 3, H, W)     diffusion view: aspect-preserving resize + crop, [-1, 1]
``original_size``   long (B, 2)            (height, width) of the source image (SD-XL ``time_ids``)
``crop_top_left``   long (B, 2)            (top, left) of the crop in the resized image
``target_size``     long (B, 2)            (height, width) of ``pixels``
``captions``        list[str]              caption of each frame
``characters``      list[list[str] | None] ground-truth names present (synthetic world), else None
``background``      list[str | None]       ground-truth background style, else None
``story_id``        list[str]              id of the source record
``frame_index``     long (B,)              index of the frame inside its record
``skipped``         dict[str, int]         samples of this batch dropped at load time, by kind
==================  =====================  ==========================================================

``mode="stories"`` (stages 2-3), a chunk of ``n_b`` consecutive frames per sample, padded to
``T = max(n_b)`` frames:

==================  ===========================  ====================================================
key                 shape / type                 meaning
==================  ===========================  ====================================================
``vit_pixels``      float (B, T, 3, Hv, Wv)      as above, per frame; zero where padded
``pixels``          float (B, T, 3, H, W)        as above, per frame; zero where padded
``original_size``   long (B, T, 2)               as above, per frame
``crop_top_left``   long (B, T, 2)               as above, per frame
``target_size``     long (B, T, 2)               as above, per frame
``frame_mask``      bool (B, T)                  True for real frames, False for padding
``num_frames``      long (B,)                    n_b, the number of real frames (2 <= n_b <= L)
``captions``        list[list[str]]              n_b captions per sample (not padded)
``characters``      list[list[list[str]] | None] per-frame ground-truth names, or None
``background``      list[str | None]             ground-truth background style, or None
``story_id``        list[str]                    id of the source record
``frame_index``     long (B, T)                  index of each frame in its record, -1 where padded
``sequence``        StorySequence                the interleaved token layout of the captions, padded
                                                 (only with a story format that has text: stages 2-3;
                                                 see :mod:`datamodules.sequence`)
``skipped``         dict[str, int]               samples of this batch dropped at load time, by kind
==================  ===========================  ====================================================

``mode="text"`` (the LLM's pretraining), a whole story's captions per sample, no images:

==================  ===========================  ====================================================
key                 shape / type                 meaning
==================  ===========================  ====================================================
``captions``        list[list[str]]              every caption of the story
``story_id``        list[str]                    id of the source record
``sequence``        TextSequence                 ``BOS cap_0 [INST] cap_1 ... EOS``, padded
                                                 (see :mod:`datamodules.sequence`)
``skipped``         dict[str, int]               always empty: no image is read
==================  ===========================  ====================================================

A batch can be empty (every sample in it was unreadable); it then holds only ``skipped`` and
``batch_size == 0`` so that modules can skip it without special-casing the collate function.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

IMAGE_KEYS = ("vit_pixels", "pixels")
SIZE_KEYS = ("original_size", "crop_top_left", "target_size")
LIST_KEYS = ("captions", "characters", "background", "story_id")


def batch_size(batch: dict[str, Any]) -> int:
    """Number of samples in a batch (0 when every sample was skipped)."""
    return len(batch.get("story_id", ()))


def collate_frames(samples: list[dict[str, Any] | str]) -> dict[str, Any]:
    """Stack frame samples; strings in ``samples`` are skip reasons, counted in ``skipped``."""
    good, skipped = _split_skipped(samples)
    batch: dict[str, Any] = {"skipped": skipped}
    if not good:
        return batch
    for key in IMAGE_KEYS:
        batch[key] = torch.stack([s[key] for s in good])
    for key in SIZE_KEYS:
        batch[key] = torch.tensor([s[key] for s in good], dtype=torch.long)
    for key in LIST_KEYS:
        batch[key] = [s[key] for s in good]
    batch["frame_index"] = torch.tensor([s["frame_index"] for s in good], dtype=torch.long)
    return batch


def collate_stories(samples: list[dict[str, Any] | str], story_format=None) -> dict[str, Any]:
    """Pad story chunks to the longest one in the batch and build ``frame_mask``; pad their
    laid-out token sequences with ``story_format`` (:class:`~datamodules.story_format.StoryFormat`)."""
    good, skipped = _split_skipped(samples)
    batch: dict[str, Any] = {"skipped": skipped}
    if not good:
        return batch
    lengths = [s["vit_pixels"].shape[0] for s in good]
    longest = max(lengths)
    for key in IMAGE_KEYS:
        batch[key] = torch.stack([_pad_frames(s[key], longest) for s in good])
    for key in SIZE_KEYS:
        batch[key] = torch.stack(
            [_pad_frames(torch.tensor(s[key], dtype=torch.long), longest) for s in good]
        )
    batch["frame_mask"] = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    batch["num_frames"] = torch.tensor(lengths, dtype=torch.long)
    frame_index = torch.full((len(good), longest), -1, dtype=torch.long)
    for row, s in enumerate(good):
        frame_index[row, : len(s["frame_index"])] = torch.tensor(s["frame_index"])
    batch["frame_index"] = frame_index
    for key in LIST_KEYS:
        batch[key] = [s[key] for s in good]
    if story_format is not None:
        batch["sequence"] = story_format.collate([s["sequence"] for s in good])
    return batch


def collate_text(samples: list[dict[str, Any]], story_format) -> dict[str, Any]:
    """Pad caption-only stories with ``story_format`` (:class:`~datamodules.story_format.StoryFormat`)."""
    return {"skipped": {}, "captions": [s["captions"] for s in samples], "story_id": [s["story_id"] for s in samples],
            "sequence": story_format.collate_text([s["sequence"] for s in samples])}


def _pad_frames(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[0] == length:
        return x
    pad = x.new_zeros((length - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad])


def _split_skipped(samples: list[dict[str, Any] | str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    good = [s for s in samples if not isinstance(s, str)]
    skipped = Counter(s for s in samples if isinstance(s, str))
    return good, dict(skipped)
