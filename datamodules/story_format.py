"""The one owner of the story format: the tokenizer, the ViT view and the interleaved layout.

In the spirit of torchtune's model transforms, one object turns frames and captions into what the
MLLM reads, in two forms that share every piece:

- the whole story (:meth:`StoryFormat.encode`, :meth:`StoryFormat.collate`): the dataset lays out
  each sample in the DataLoader workers, so stage-2/3 batches arrive tokenised
  (``batch["sequence"]``) and the collate step only pads;
- step by step (:attr:`StoryFormat.tokens`, :meth:`StoryFormat.caption_ids`,
  :meth:`StoryFormat.decode_text`): story generation and caption decoding feed the same tokens one
  story step at a time (``tests/test_generation_parity.py`` checks both forms agree).

The ViT view (:meth:`StoryFormat.vit_view`, :meth:`StoryFormat.vit_pixels_of`) is the data
pipeline's, also for re-encoding a drawn image. Stage 1 has a format without text (the ViT view only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from datamodules.images import FrameViews
from datamodules.sequence import (
    StorySample,
    StorySequence,
    Supervise,
    TextSequence,
    layout_story,
    layout_text,
    pad_stories,
    pad_text,
)
from datamodules.tokenizer import STEP_SEPARATOR, StoryTokens, load_story_tokenizer, make_tiny_tokenizer


@dataclass
class StoryFormatConfig:
    """The text side of the format (serialised in the stage-2 export)."""

    tokenizer: str = "data/synthetic/tokenizer"  # a local tokenizer folder (real scale: the LLM's own)
    # when the folder is absent, train a byte-level BPE of this size on the train split's captions
    # (the tiny default, in prepare_data); None: the folder must exist
    train_vocab_size: int | None = None
    num_queries: int = 64  # Q, the image slots of a frame (``<img_00000>`` ...)
    supervise: Supervise = "last"  # see datamodules.sequence
    max_length: int = 1280  # token budget; longer samples lose whole leading steps (counted)
    # a later step's separator and caption: ``separate`` encodings, or ``joined``, the one string
    # "[INST]" + caption the released agent was trained on (with Llama's tokenizer the caption's
    # first word then lacks its leading-space piece "▁", so it gets other ids than alone)
    prompt: Literal["separate", "joined"] = "separate"


class StoryFormat:
    """Tokenizer + ViT view + layout. ``config=None``: frames only (stage 1), no text;
    ``vit_image_size=None``: text only (the LLM's pretraining), no images."""

    def __init__(self, config: StoryFormatConfig | None, vit_image_size: int | None):
        self.config = config
        self.vit_image_size = vit_image_size
        self.views = FrameViews(vit_size=vit_image_size) if vit_image_size is not None else None
        self._tokenizer = None
        self._tokens: StoryTokens | None = None

    def replace(self, **changes) -> StoryFormat:
        """The same format with some of its config changed (e.g. stage 3's ``supervise``)."""
        return StoryFormat(dataclasses.replace(self.config, **changes), self.vit_image_size)

    # -- tokenizer ---------------------------------------------------------------------------

    @property
    def has_text(self) -> bool:
        return self.config is not None

    def has_tokenizer(self) -> bool:
        return self.has_text and Path(self.config.tokenizer).exists()

    def prepare(self, corpus: Sequence[str]) -> None:
        """Train the tiny tokenizer on ``corpus`` (jsonl files) when it is configured and absent."""
        if not self.has_text or self.has_tokenizer():
            return
        if self.config.train_vocab_size is None:
            raise FileNotFoundError(f"story_format.tokenizer: {self.config.tokenizer} does not exist; point it at the "
                                    "LLM's local tokenizer folder, or set train_vocab_size to train the tiny one")
        make_tiny_tokenizer(list(corpus), self.config.tokenizer, self.config.train_vocab_size)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.has_text:
                raise ValueError("this story format has no text (stage 1): give it a StoryFormatConfig")
            self._tokenizer = load_story_tokenizer(self.config.tokenizer, self.config.num_queries)
        return self._tokenizer

    @property
    def tokens(self) -> StoryTokens:
        """The ids of the story tokens (``<img>``, the slots, the step separator, ...)."""
        if self._tokens is None:
            self._tokens = StoryTokens.of(self.tokenizer, self.config.num_queries)
        return self._tokens

    def __getstate__(self) -> dict:
        # DataLoader workers reload the tokenizer from its folder instead of unpickling it
        return {**self.__dict__, "_tokenizer": None, "_tokens": None}

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def caption_ids(self, caption: str) -> list[int]:
        return self.tokenizer(caption, add_special_tokens=False)["input_ids"]

    def step_caption_ids(self, caption: str, first: bool) -> list[int]:
        """The caption's ids as they follow its step's opening (BOS, or the separator's ids).

        ``prompt: joined`` encodes separator and caption as one string and keeps what follows
        the separator's ids; should a tokenizer merge the two (no such prefix), the caption is
        encoded alone, so a step always opens with the same ids, which generation feeds."""
        if first or self.config.prompt == "separate":
            return self.caption_ids(caption)
        joined, separator = self.caption_ids(STEP_SEPARATOR + caption), self.tokens.separator
        if joined[: len(separator)] == separator:
            return joined[len(separator):]
        return self.caption_ids(caption)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # -- the whole story -----------------------------------------------------------------------

    def encode(self, captions: Sequence[str]) -> StorySample:
        """One story (a caption per frame) laid out within the token budget (in the workers)."""
        ids = [self.step_caption_ids(c, first=j == 0) for j, c in enumerate(captions)]
        return layout_story(ids, self.tokens, self.config.supervise, self.config.max_length)

    def collate(self, samples: list[StorySample]) -> StorySequence:
        return pad_stories(samples, self.tokens.pad, self.config.num_queries, self.config.supervise)

    def encode_batch(self, captions: Sequence[Sequence[str]]) -> StorySequence:
        """A batch laid out on the spot (batches that did not come through the DataLoader)."""
        return self.collate([self.encode(story) for story in captions])

    def encode_text(self, captions: Sequence[str]) -> StorySample:
        """One story's captions alone (no images), laid out within the token budget."""
        ids = [self.step_caption_ids(c, first=j == 0) for j, c in enumerate(captions)]
        return layout_text(ids, self.tokens, self.config.max_length)

    def collate_text(self, samples: list[StorySample]) -> TextSequence:
        return pad_text(samples, self.tokens.pad)

    # -- the ViT view ---------------------------------------------------------------------------

    def vit_view(self, image: Image.Image) -> torch.Tensor:
        return self.views.vit_view(image)

    def vit_pixels_of(self, images: torch.Tensor) -> torch.Tensor:
        """ViT views of ``[-1, 1]`` images (B, 3, H, W), through the same path as a frame on disk."""
        uint8 = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        views = [self.vit_view(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in uint8]
        return torch.stack(views).to(images.device)
