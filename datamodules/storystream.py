"""The StoryStream DataModule shared by all three stages.

Reads StoryStream-format jsonl files (images under ``image_root``) or webdataset shards made by
:mod:`datamodules.to_webdataset`, validates every record once in ``setup`` (bad ones are
skipped and counted), and serves either single frames (stage 1) or random-length story chunks
(stages 2-3). Batch keys are documented in :mod:`datamodules.batch`.

Sampling is owned here, not by Lightning (:mod:`datamodules.dataset`): exact per-epoch shuffles,
disjoint rank slices, and mid-epoch resume from the position this module saves in checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules import records, shards
from datamodules.batch import collate_frames, collate_stories, collate_text
from datamodules.dataset import EpochSampler, StoryStreamDataset
from datamodules.images import FileStore, FrameViews, ImageStore, TarStore
from datamodules.records import SkipCounter, StoryRecord
from datamodules.story_format import StoryFormat

log = logging.getLogger(__name__)

DEFAULT_VIT_SIZE = 224  # the ViT view's side when neither the config nor a story format gives one

@dataclass
class SyntheticWorld:
    """Where and how to make the synthetic world when the configured files are absent."""

    out: str = "data/synthetic"
    stories: int = 400
    seed: int = 0
    size: int = 64


class StoryStreamDataModule(L.LightningDataModule):
    """StoryStream stories for every stage (see the module docstring and :mod:`datamodules.batch`).

    Args:
        train_files / val_files / test_files / predict_files: jsonl files, or shard patterns
            such as ``shards/train-{000000..000009}.tar``; a string or a list.
        image_root: folder that the jsonl image paths are relative to (unused for shards).
        mode: ``"frames"`` (single images, stage 1), ``"stories"`` (chunks, stages 2-3) or ``"text"``
            (whole stories' captions, no images: the tiny LLM's pretraining).
        max_images / min_images: a story sample has ``min_images..max_images`` consecutive frames.
        vit_image_size: side of the ViT view; leave it unset when ``story_format`` gives it.
        story_format: the model's :class:`~datamodules.story_format.StoryFormat` (``train.py`` links it
            from the model): the ViT view's size, and, for stages 2-3, the tokenizer and layout that
            story samples are encoded with in the workers. Its tokenizer is trained on the train
            split in ``prepare_data`` when the format asks for it.
        image_size: (height, width) or a side of the diffusion view.
        synthetic: make the synthetic world in ``prepare_data`` when the files are absent.
    """

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
        image_root: str | None = None,
        mode: Literal["frames", "stories", "text"] = "stories",
        max_images: int = 10,
        min_images: int = 2,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        vit_image_size: int | None = None,
        image_size: int | tuple[int, int] = 64,
        random_crop: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        synthetic: SyntheticWorld | None = None,
        story_format: StoryFormat | None = None,
    ):
        super().__init__()
        if min_images < 1 or max_images < min_images:
            raise ValueError(f"need 1 <= min_images <= max_images, got {min_images} and {max_images}")
        self.save_hyperparameters(ignore=["story_format"])
        self.story_format = story_format
        if story_format is not None and story_format.vit_image_size is not None:
            if vit_image_size not in (None, story_format.vit_image_size):
                raise ValueError(f"data.vit_image_size={vit_image_size} but the model's vision encoder takes "
                                 f"{story_format.vit_image_size}px: remove vit_image_size from the data config")
            vit_image_size = story_format.vit_image_size
        self.files: dict[str, list[str]] = {
            "train": _as_list(train_files),
            "val": _as_list(val_files),
            "test": _as_list(test_files),
            "predict": _as_list(predict_files),
        }
        self.image_root = image_root
        self.mode = mode
        self.max_images = max_images
        self.min_images = min_images
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.views = FrameViews(vit_size=vit_image_size or DEFAULT_VIT_SIZE, image_size=size, random_crop=random_crop)
        self.shuffle = shuffle
        self.seed = seed
        self.synthetic = synthetic
        self.datasets: dict[str, StoryStreamDataset] = {}
        self.setup_skips = SkipCounter()  # records rejected in setup
        self.load_skips = SkipCounter()  # samples rejected while loading, since the last report
        self._samplers: dict[str, EpochSampler] = {}
        self._resume_state: dict[str, Any] | None = None

    # -- data creation and loading -------------------------------------------------------

    def prepare_data(self) -> None:
        """Make the synthetic world once (rank 0 of each node) if it is configured and absent, then
        the story format's tokenizer (trained on the train split) if it asks for one."""
        if self.synthetic is not None:
            self._prepare_synthetic()
        if self.story_format is not None:
            self.story_format.prepare(self.files["train"])

    def _prepare_synthetic(self) -> None:
        needed = [f for fs in self.files.values() for f in fs if not shards.is_shard_spec(f)]
        if needed and all(Path(f).exists() for f in needed):
            _check_world(Path(self.synthetic.out), self.synthetic)
        else:
            make_synthetic_world(self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        wanted = splits.get(stage, ("train", "val", "test", "predict")) if stage else ("train", "val", "test", "predict")
        for split in wanted:
            if split in self.datasets or not self.files[split]:
                continue
            self._check_paths(split)
            self.datasets[split] = self._build(split)
        if self.setup_skips.total():
            log.warning("setup skipped %d records or frames: %s", self.setup_skips.total(), dict(self.setup_skips.counts))

    def _check_paths(self, split: str) -> None:
        for spec in self.files[split]:
            paths = shards.expand_shards(spec) if shards.is_shard_spec(spec) else [spec]
            for path in paths:
                if not Path(path).is_file():
                    hint = " (or set `data.synthetic` to generate the synthetic world there)" if self.synthetic is None else ""
                    raise FileNotFoundError(f"{split}_files: {path} does not exist; fix the path in the data config{hint}")
            if not shards.is_shard_spec(spec) and self.mode != "text" and (self.image_root is None or not Path(self.image_root).is_dir()):
                raise FileNotFoundError(
                    f"image_root: {self.image_root} is not a folder; set `data.image_root` to the folder "
                    f"that the image paths in {spec} are relative to"
                )

    def _build(self, split: str) -> StoryStreamDataset:
        stories: list[StoryRecord] = []
        members: dict[str, tuple[str, int, int]] = {}
        file_stories: list[StoryRecord] = []
        for spec in self.files[split]:
            if shards.is_shard_spec(spec):
                for path in shards.expand_shards(spec):
                    found, refs = shards.index_shard(path, self.min_images, self.setup_skips)
                    stories.extend(found)
                    members.update(refs)
            else:
                file_stories.extend(records.read_jsonl(Path(spec), self.min_images, self.setup_skips))
        if members and file_stories:
            raise ValueError(f"{split}_files mixes jsonl files and shards; use one kind per split")
        if file_stories:
            store: ImageStore = FileStore(str(self.image_root))
            # text mode reads no image, so none is checked
            stories, frames = (file_stories, None) if self.mode == "text" else self._check_images(file_stories, store)
        else:
            store = TarStore(members)
            frames = None
        log.info("%s: %d stories from %s", split, len(stories), self.files[split])
        return StoryStreamDataset(stories, store, self.views, self.mode, self.min_images, self.max_images, self.seed, frames,
                                  self.story_format)

    def _check_images(self, stories: list[StoryRecord], store: FileStore) -> tuple[list[StoryRecord], list[tuple[int, int]]]:
        """Drop a story (stories mode) or a frame (frames mode) whose image file is not usable."""
        kept: list[StoryRecord] = []
        frames: list[tuple[int, int]] = []
        for story in stories:
            bad = {f: kind for f, ref in enumerate(story.images) if (kind := records.check_image_file(store.path(ref)))}
            for f, kind in bad.items():
                self.setup_skips.skip(kind, f"{story.source} ({store.path(story.images[f])})")
            if self.mode == "stories" and bad:
                continue
            frames.extend((len(kept), f) for f in range(len(story)) if f not in bad)
            kept.append(story)
        return kept, frames

    # -- loaders ---------------------------------------------------------------------------

    def single_rank_train_loader(self) -> DataLoader:
        """The training split in epoch 0's order as one process reads it, whatever the world size: for what
        rank 0 computes once from the data (stage 2's codebook), so that 1 rank or 8 compute the same."""
        return self._loader("train", self.batch_size, train=True, replicas=(1, 0))

    def _loader(self, split: str, batch_size: int, train: bool, replicas: tuple[int, int] | None = None) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        dataset = self.datasets[split]
        world_size, rank = replicas or self._replicas()
        sampler = EpochSampler(len(dataset), world_size, rank, shuffle=train and self.shuffle, seed=self.seed, even=train)
        if replicas is None:  # not a side read: this loader takes the resume position and is the one checkpointed
            if train and self._resume_state:
                sampler.set_epoch(self._resume_state["epoch"])
                sampler.start_index = self._resume_state["start_index"]
                self._resume_state = None
            self._samplers[split] = sampler
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self._collate(dataset),
            persistent_workers=False,
            drop_last=False,
        )

    def _collate(self, dataset: StoryStreamDataset):
        if self.mode == "frames":
            return collate_frames
        return functools.partial(collate_text if self.mode == "text" else collate_stories, story_format=dataset.story_format)

    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size, train=False)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Collect what the workers skipped; the batch itself goes on without it."""
        skipped = batch.pop("skipped", None)
        if skipped:
            self.load_skips.merge(skipped)
        return batch

    # -- reporting and resume --------------------------------------------------------------

    def skip_report(self, reset: bool = True) -> dict[str, int]:
        """Skips by kind since the last report (load time) plus those of setup."""
        report = dict(self.setup_skips.counts)
        for kind, n in self.load_skips.counts.items():
            report[kind] = report.get(kind, 0) + n
        if reset:
            self.load_skips.counts.clear()
        return report

    def state_dict(self) -> dict[str, Any]:
        """The training data position, saved in checkpoints for exact mid-epoch resume."""
        trainer = getattr(self, "trainer", None)
        sampler = self._samplers.get("train")
        if trainer is None or sampler is None:
            return {}
        # The loop's progress counts batches since the start of the epoch; "processed" already
        # includes the batch whose on_train_batch_end is saving this checkpoint.
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": sampler.epoch, "start_index": batches_done * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = dict(state_dict) if state_dict else None


def make_synthetic_world(config: SyntheticWorld) -> Path:
    """Generate into a temporary sibling folder, then rename: a crash never leaves half a world."""
    from datamodules import synthetic

    out = Path(config.out)
    if (out / "train.jsonl").exists():
        _check_world(out, config)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    log.info("making the synthetic world (%d stories) in %s", config.stories, out)
    synthetic.generate(tmp, config.stories, config.seed, (config.size, config.size))
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race, or `out` exists but is incomplete
        if not (out / "train.jsonl").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_world(out: Path, config: SyntheticWorld) -> None:
    """A world already on disk must be the one the config asks for: a config that now asks for more
    stories would otherwise train on the old world without a word."""
    from datamodules import synthetic

    made = out / synthetic.WORLD_FILE
    if not made.exists():  # made before worlds recorded their settings: nothing to compare
        return
    found = json.loads(made.read_text())
    wanted = synthetic.world_settings(config.stories, config.seed, (config.size, config.size))
    if found != wanted:
        raise ValueError(f"{out} holds a synthetic world made with {found}, but the config asks for {wanted}: "
                         f"delete {out} (it is made again on first use) or set data.synthetic.out and the "
                         f"split files to another folder")


def _as_list(files: str | Sequence[str] | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)
