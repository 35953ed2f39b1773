"""Story tokenizers: the LLM's own (real scale) or a small BPE trained on the synthetic captions.

Both get the same extra vocabulary: ``<img>``, ``</img>`` and ``Q`` image-slot tokens
``<img_00000>`` ... (the generation queries). The step separator ``[INST]`` is ordinary text for
Llama's tokenizer; the tiny tokenizer learns it as one token of its base vocabulary, so both add
exactly ``Q + 2`` new tokens (66 at real scale).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from datamodules.records import caption_corpus

log = logging.getLogger(__name__)

IMG_START = "<img>"
IMG_END = "</img>"
STEP_SEPARATOR = "[INST]"


def image_slot_tokens(num_queries: int) -> list[str]:
    return [f"<img_{i:05d}>" for i in range(num_queries)]


@dataclass
class StoryTokens:
    """Ids of the story-specific tokens in one tokenizer."""

    img_start: int
    img_end: int
    slots: list[int]
    separator: list[int]  # the step separator's token ids (several for Llama's tokenizer)
    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, num_queries: int) -> StoryTokens:
        ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, *image_slot_tokens(num_queries)])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer lacks the image tokens; call add_story_tokens first")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            img_start=ids[0],
            img_end=ids[1],
            slots=ids[2:],
            separator=tokenizer(STEP_SEPARATOR, add_special_tokens=False)["input_ids"],
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            pad=pad,
        )

    def step_opening(self, first: bool) -> list[int]:
        """What starts a story step: BOS for the first, the step separator for every later one."""
        return [self.bos] if first else list(self.separator)


def add_story_tokens(tokenizer: PreTrainedTokenizerBase, num_queries: int) -> int:
    """Add ``<img>``, ``</img>`` and the slot tokens as special tokens; return how many were new."""
    added = tokenizer.add_tokens([IMG_START, IMG_END, *image_slot_tokens(num_queries)], special_tokens=True)
    if tokenizer.pad_token is None:  # Llama has none; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return added


def train_caption_tokenizer(captions: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learned from captions (exact round trip, no unknown bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", STEP_SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(captions, trainer=trainer)
    from tokenizers import processors

    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def train_tokenizer_once(train_jsonl: str | Path | Sequence[str | Path], out_dir: str | Path,
                         train: Callable[[list[str]], PreTrainedTokenizerBase], what: str) -> Path:
    """Train ``what`` with ``train`` on the captions of one jsonl file or several and
    ``save_pretrained`` it to ``out_dir``, unless it is there already (once, in prepare_data)."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return out_dir
    captions = caption_corpus(train_jsonl)
    if not captions:
        raise ValueError(f"no captions in {train_jsonl} to train the {what} on")
    tokenizer = train(captions)
    tokenizer.save_pretrained(str(out_dir))
    log.info("trained the %s (%d tokens) on %d captions -> %s", what, len(tokenizer), len(captions), out_dir)
    return out_dir


def make_tiny_tokenizer(train_jsonl: str | Path | Sequence[str | Path], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """The tiny LLM's byte-level BPE, trained on a split's captions."""
    return train_tokenizer_once(train_jsonl, out_dir, lambda captions: train_caption_tokenizer(captions, vocab_size),
                                "tiny caption tokenizer")


def load_story_tokenizer(path: str | Path, num_queries: int) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (never the hub) and give it the story tokens."""
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist; point `tokenizer_path` at a local folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    add_story_tokens(tokenizer, num_queries)
    return tokenizer
