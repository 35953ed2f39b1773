"""The interleaved story layout (pure functions over token ids; no model, no tokenizer).

One sample with frames ``0..k`` becomes::

    BOS cap_0 <img> q*Q </img> [INST] cap_1 <img> q*Q </img> ... [INST] cap_k <img> g*Q </img> EOS

Text comes before its image. Context images' ``Q`` slots (``q``) are overwritten with the input
resampler's output for that frame; the target image keeps the learned ``<img_xxxxx>`` query
embeddings (``g``) and the LLM's hidden states there regress its features.

``supervise="last"`` (SEED-Story): cross-entropy on ``[INST] cap_k <img>`` and ``EOS`` only;
image tokens and ``</img>`` are never labels; one regression target, frame ``k``.

``supervise="all"``: every step's text is labelled and every frame ``j >= 1`` is a regression
target in the same pass. Frame ``j``'s block becomes ``<img> g*Q q*Q </img>``: the query copy
``g`` and the context copy ``q`` share the same positions, and a 4-D mask hides each ``g`` block
from every token outside it. Each token therefore sees exactly what it would see in its own
``supervise="last"`` sequence (the test suite checks the logits are equal), with ~L x more
targets per forward pass.

:func:`layout_story` lays out one sample (in the DataLoader workers); :func:`pad_stories` only pads.
:func:`layout_text` / :func:`pad_text` do the same for the captions alone (the LLM's pretraining on text,
``BOS cap_0 [INST] cap_1 ... EOS``), with the same ids for every caption and step opening.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

from datamodules.tokenizer import StoryTokens

IGNORE_INDEX = -100

Supervise = Literal["last", "all"]


@dataclass
class StorySequence:
    """A padded batch of interleaved sequences and where its image slots are.

    Slot tensors hold flat indices into ``(B * T)``; ``*_frames`` hold (row, frame) pairs that
    say which frame of the batch (``frame`` indexes the batch's frames of that row) fills or is
    regressed at those slots.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) long, or (B, 1, T, T) bool when supervise="all"
    position_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where not supervised
    context_slots: torch.Tensor  # (Nc, Q)
    context_frames: torch.Tensor  # (Nc, 2)
    target_slots: torch.Tensor  # (Ng, Q)
    target_frames: torch.Tensor  # (Ng, 2)
    # each target step's text (opening, caption, <img>): flat indices, padded to the longest, and
    # False where padded; what ``regress_from: step`` lets the output resampler read
    target_text: torch.Tensor  # (Ng, L)
    target_text_mask: torch.Tensor  # (Ng, L) bool
    dropped_steps: int = 0  # leading steps cut to fit max_length
    truncated_captions: int = 0  # captions cut because one step alone exceeded max_length
    lengths: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> StorySequence:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass
class StorySample:
    """One laid-out story: token ids, labels, positions and where its image slots start."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    block: list[int] = field(default_factory=list)  # id of the hidden query block, -1 elsewhere
    context: list[tuple[int, int]] = field(default_factory=list)  # (frame, first index)
    targets: list[tuple[int, int]] = field(default_factory=list)
    target_text: list[int] = field(default_factory=list)  # where each target's step (its opening) starts
    dropped_steps: int = 0
    truncated_captions: int = 0

    def add(self, token: int, label: bool, position: int | None = None, block: int = -1) -> None:
        if position is None:  # the next position after the previous token
            position = self.positions[-1] + 1 if self.positions else 0
        self.positions.append(position)
        self.ids.append(token)
        self.labels.append(token if label else IGNORE_INDEX)
        self.block.append(block)


def _layout(caption_ids: list[list[int]], first_frame: int, tokens: StoryTokens, supervise: Supervise) -> StorySample:
    sample = StorySample()
    last = len(caption_ids) - 1
    q = len(tokens.slots)
    for j, caption in enumerate(caption_ids):
        labelled = supervise == "all" or j == last
        step_start = len(sample.ids)
        for token in tokens.step_opening(first=j == 0):
            sample.add(token, label=labelled and j > 0)  # BOS is never a label, [INST] is
        for token in caption:
            sample.add(token, label=labelled)
        sample.add(tokens.img_start, label=labelled)
        start = sample.positions[-1] + 1
        frame = first_frame + j
        is_target = j == last or (supervise == "all" and j >= 1)
        if is_target:
            sample.targets.append((frame, len(sample.ids)))
            sample.target_text.append(step_start)
            hidden = j != last  # a context copy follows: hide these queries from later tokens
            for i, slot in enumerate(tokens.slots):
                sample.add(slot, label=False, position=start + i, block=frame if hidden else -1)
        if j != last:
            sample.context.append((frame, len(sample.ids)))
            for i, slot in enumerate(tokens.slots):
                sample.add(slot, label=False, position=start + i)
        sample.add(tokens.img_end, label=False, position=start + q)
    sample.add(tokens.eos, label=True)
    return sample


def layout_story(caption_ids: list[list[int]], tokens: StoryTokens, supervise: Supervise = "last",
                 max_length: int | None = None) -> StorySample:
    """Lay out one tokenised story (>= 1 captions, one per frame) within ``max_length`` tokens.

    Too long: whole leading steps are dropped (counted); if the last step alone is too long, its
    caption is cut (counted).
    """
    first, dropped, truncated = 0, 0, 0
    sample = _layout(caption_ids, first, tokens, supervise)
    while max_length is not None and len(sample.ids) > max_length and len(caption_ids) - first > 1:
        first += 1  # drop a whole leading step (its caption and image)
        dropped += 1
        sample = _layout(caption_ids[first:], first, tokens, supervise)
    if max_length is not None and len(sample.ids) > max_length:
        keep = max(1, len(caption_ids[-1]) - (len(sample.ids) - max_length))
        truncated = 1
        sample = _layout([caption_ids[-1][:keep]], len(caption_ids) - 1, tokens, supervise)
    sample.dropped_steps, sample.truncated_captions = dropped, truncated
    return sample


def pad_stories(samples: list[StorySample], pad: int, num_slots: int, supervise: Supervise,
                side: Literal["left", "right"] = "right") -> StorySequence:
    """Pad laid-out samples into one :class:`StorySequence` (the collate step: nothing else happens here)."""
    batch, width = len(samples), max(len(s.ids) for s in samples)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    mask2d = torch.zeros((batch, width), dtype=torch.long)
    blocks = torch.full((batch, width), -1, dtype=torch.long)
    context, context_frames, targets, target_frames, texts = [], [], [], [], []
    for row, s in enumerate(samples):
        offset = width - len(s.ids) if side == "left" else 0
        cols = slice(offset, offset + len(s.ids))
        input_ids[row, cols] = torch.tensor(s.ids)
        labels[row, cols] = torch.tensor(s.labels)
        positions[row, cols] = torch.tensor(s.positions)
        mask2d[row, cols] = 1
        blocks[row, cols] = torch.tensor(s.block)
        for frame, start in s.context:
            context.append(row * width + offset + start + torch.arange(num_slots))
            context_frames.append((row, frame))
        for (frame, start), text_start in zip(s.targets, s.target_text, strict=True):
            targets.append(row * width + offset + start + torch.arange(num_slots))
            target_frames.append((row, frame))
            texts.append(row * width + offset + torch.arange(text_start, start))
    text_length = max(len(t) for t in texts)
    target_text = torch.stack([torch.cat([t, t[:1].expand(text_length - len(t))]) for t in texts])
    target_text_mask = torch.stack([torch.arange(text_length) < len(t) for t in texts])
    attention: torch.Tensor = mask2d
    if supervise == "all":
        attention = _block_causal_mask(mask2d, blocks)
    return StorySequence(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        labels=labels,
        context_slots=torch.stack(context) if context else torch.zeros((0, num_slots), dtype=torch.long),
        context_frames=torch.tensor(context_frames, dtype=torch.long).view(-1, 2),
        target_slots=torch.stack(targets),
        target_frames=torch.tensor(target_frames, dtype=torch.long).view(-1, 2),
        target_text=target_text,
        target_text_mask=target_text_mask,
        dropped_steps=sum(s.dropped_steps for s in samples),
        truncated_captions=sum(s.truncated_captions for s in samples),
        lengths=[len(s.ids) for s in samples],
    )


def _block_causal_mask(mask2d: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, padding hidden, and each hidden query block seen only from inside."""
    width = mask2d.shape[1]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    keys_real = mask2d.bool()[:, None, :]
    key_block = blocks[:, None, :]
    query_block = blocks[:, :, None]
    visible = causal[None] & keys_real & ((key_block == -1) | (key_block == query_block))
    # a padding query row with no visible key would give NaN in softmax: let it see itself
    visible |= torch.eye(width, dtype=torch.bool)[None] & ~mask2d.bool()[:, :, None]
    return visible[:, None]


# -- text alone: the LLM's pretraining on the stories' captions -----------------------------------


@dataclass
class TextSequence:
    """A padded batch of caption-only stories: ``BOS cap_0 [INST] cap_1 ... [INST] cap_k EOS``."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on BOS and padding
    dropped_steps: int = 0  # leading steps cut to fit max_length
    truncated_captions: int = 0  # captions cut because one step alone exceeded max_length

    def to(self, device: torch.device | str) -> TextSequence:
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       labels=self.labels.to(device))


def layout_text(caption_ids: list[list[int]], tokens: StoryTokens, max_length: int | None = None) -> StorySample:
    """One story's captions as text alone, each step opened as in :func:`layout_story` (so a caption has
    the same ids in both) with nothing in place of its image. Every token but BOS is a label. Too
    long: whole leading steps are dropped (counted); a single step still too long is cut (counted)."""
    for first in range(len(caption_ids)):
        sample = StorySample()
        for j, caption in enumerate(caption_ids[first:]):
            for token in tokens.step_opening(first=j == 0):
                sample.add(token, label=j > 0)
            for token in caption:
                sample.add(token, label=True)
        sample.add(tokens.eos, label=True)
        sample.dropped_steps = first
        if max_length is None or len(sample.ids) <= max_length:
            return sample
    keep = max_length - 1  # the last step alone is too long: cut its caption, keep EOS
    sample.ids, sample.labels = sample.ids[:keep] + sample.ids[-1:], sample.labels[:keep] + sample.labels[-1:]
    sample.positions, sample.block = sample.positions[: keep + 1], sample.block[: keep + 1]
    sample.truncated_captions = 1
    return sample


def pad_text(samples: list[StorySample], pad: int) -> TextSequence:
    """Pad caption-only samples on the right (the collate step of ``mode="text"``)."""
    width = max(len(s.ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        input_ids[row, : len(s.ids)] = torch.tensor(s.ids)
        labels[row, : len(s.ids)] = torch.tensor(s.labels)
        mask[row, : len(s.ids)] = 1
    return TextSequence(input_ids, mask, labels, dropped_steps=sum(s.dropped_steps for s in samples),
                        truncated_captions=sum(s.truncated_captions for s in samples))
