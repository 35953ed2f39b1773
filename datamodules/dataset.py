"""What a StoryStream DataLoader draws from: the dataset of frames or story chunks, and its sampler.

:class:`EpochSampler` shuffles with ``seed + epoch``, gives each rank a disjoint slice, and
DataLoader workers split that slice batch by batch, so each sample is seen once per epoch across
ranks and workers. The random chunk of a story is drawn from ``(seed, epoch, index)``, so a run is
reproducible and can be resumed mid-epoch. Story samples are laid out by the model's story format
here, in the workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from datamodules.images import FrameViews, ImageStore, UnreadableImage, decode_rgb
from datamodules.records import StoryRecord
from datamodules.story_format import StoryFormat


class StoryStreamDataset(Dataset):
    """Map-style dataset indexed by ``(index, epoch)`` pairs from :class:`EpochSampler`.

    Returns a sample dict, or a skip kind (str) when an image cannot be decoded: the collate
    function counts those, so one unreadable file costs one sample, never the run.
    """

    def __init__(
        self,
        stories: list[StoryRecord],
        store: ImageStore,
        views: FrameViews,
        mode: Literal["frames", "stories", "text"],
        min_images: int,
        max_images: int,
        seed: int,
        frames: list[tuple[int, int]] | None = None,
        story_format: StoryFormat | None = None,
    ):
        self.stories = stories
        self.store = store
        self.views = views
        self.mode = mode
        self.min_images = min_images
        self.max_images = max_images
        self.seed = seed
        self.story_format = story_format if story_format is not None and story_format.has_text else None
        if mode == "text" and self.story_format is None:
            raise ValueError('mode="text" needs a story format with a tokenizer (the model\'s, linked by train.py)')
        # frames mode: (story, frame) pairs whose image passed the setup check
        self.frames = frames if frames is not None else [(s, f) for s, st in enumerate(stories) for f in range(len(st))]

    def __len__(self) -> int:
        return len(self.frames) if self.mode == "frames" else len(self.stories)

    def chunk_bounds(self, index: int, epoch: int) -> tuple[int, int]:
        """(start, length) of the chunk drawn for story ``index`` in ``epoch``: 2..L frames."""
        n = len(self.stories[index])
        rng = np.random.default_rng([self.seed, epoch, index])
        length = int(rng.integers(self.min_images, min(self.max_images, n) + 1))
        start = int(rng.integers(0, n - length + 1))
        return start, length

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any] | str:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        try:
            if self.mode == "frames":
                return self._frame(index, rng)
            if self.mode == "text":
                return self._text(index)
            return self._story(index, epoch, rng)
        except UnreadableImage as err:
            return err.kind

    def load_frames(self, index: int, frames: Sequence[int]) -> dict[str, Any]:
        """Chosen frames of story ``index`` in the stories-mode sample layout (for callbacks, notebooks).

        Raises :class:`~datamodules.images.UnreadableImage` if a frame cannot be decoded.
        """
        story = self.stories[index]
        frames = [f for f in frames if 0 <= f < len(story)]
        views = [self._load(story.images[f], None) for f in frames]
        return {
            "vit_pixels": torch.stack([v["vit_pixels"] for v in views]),
            "pixels": torch.stack([v["pixels"] for v in views]),
            "captions": [story.captions[f] for f in frames],
            "characters": [story.characters[f] for f in frames] if story.characters else None,
            "background": story.background,
            "story_id": story.story_id,
            "frame_index": list(frames),
        }

    def _load(self, ref: str, rng: np.random.Generator | None) -> dict[str, Any]:
        return self.views(decode_rgb(self.store.read(ref), ref), rng)

    def _frame(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        story_index, frame = self.frames[index]
        story = self.stories[story_index]
        sample = self._load(story.images[frame], rng)
        sample.update(
            captions=story.captions[frame],
            characters=story.characters[frame] if story.characters else None,
            background=story.background,
            story_id=story.story_id,
            frame_index=frame,
        )
        return sample

    def _story(self, index: int, epoch: int, rng: np.random.Generator) -> dict[str, Any]:
        story = self.stories[index]
        start, length = self.chunk_bounds(index, epoch)
        span = range(start, start + length)
        views = [self._load(story.images[f], rng) for f in span]
        captions = [story.captions[f] for f in span]
        sample = {
            "vit_pixels": torch.stack([v["vit_pixels"] for v in views]),
            "pixels": torch.stack([v["pixels"] for v in views]),
            "original_size": [v["original_size"] for v in views],
            "crop_top_left": [v["crop_top_left"] for v in views],
            "target_size": [v["target_size"] for v in views],
            "captions": captions,
            "characters": [story.characters[f] for f in span] if story.characters else None,
            "background": story.background,
            "story_id": story.story_id,
            "frame_index": list(span),
        }
        if self.story_format is not None:  # tokenised and laid out here, in the worker
            sample["sequence"] = self.story_format.encode(captions)
        return sample

    def _text(self, index: int) -> dict[str, Any]:
        """A whole story's captions, laid out as text alone (no image is read)."""
        story = self.stories[index]
        return {"captions": list(story.captions), "story_id": story.story_id,
                "sequence": self.story_format.encode_text(story.captions)}


class EpochSampler(DistributedSampler):
    """Yields ``(index, epoch)``; each rank takes a disjoint slice of a per-epoch permutation.

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of injecting its own.
    Training (``even=True``) drops the ``< world_size`` remainder of the permutation so every
    rank runs the same number of steps (which samples are dropped changes every epoch); other
    splits (``even=False``) give every sample to exactly one rank. No sample is ever repeated.
    ``start_index`` skips the first samples of this rank's slice (exact mid-epoch resume).
    """

    def __init__(self, size: int, num_replicas: int, rank: int, shuffle: bool, seed: int, even: bool):
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.even = even
        self.epoch = 0
        self.start_index = 0

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        if self.even:
            order = order[: self.size - self.size % self.num_replicas]
        return [int(i) for i in order[self.rank :: self.num_replicas]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.start_index :]:
            yield index, self.epoch

    def __len__(self) -> int:
        # the whole epoch's length, resumed or not: Lightning reads an epoch's batch count from it once, when
        # the loader is set up, and counts a resumed epoch from the batches already done, so the remainder's
        # length would cut the resumed epoch and every later one short
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_index = 0
        self.epoch = epoch
