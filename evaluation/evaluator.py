"""The story evaluator: a small CLIP-style network trained on the synthetic world, and its files.

Story-visualisation papers (StoryDALL-E, StoryGPT-V) score generated frames with classifiers
trained on the dataset itself; nothing can be downloaded here, so the embedded default trains
its own: a transformers ``CLIPModel`` from a tiny ``CLIPConfig`` (random init under a seed),
learned contrastively on (frame, caption) pairs, plus two heads on the projected image
embedding: characters present (multi-label, one logit per name) and background (softmax).
The LightningModule that trains it is :class:`lightning_modules.evaluator.EvaluatorModule`.

Images come in the ``pixels`` convention of the batch contract, [-1, 1], because that is what
generated frames look like; the CLIP normalisation happens inside. ``save_evaluator`` writes a
``save_pretrained`` folder (model, tokenizer, image processor) that ``CLIPModel`` /
``CLIPProcessor`` load as is, plus the heads (safetensors) and a JSON of label names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from datamodules.exports import EXPORT_FILE, load_tensors, prefixed, read_export, save_tensors, writing_export
from datamodules.images import CLIP_MEAN, CLIP_STD
from datamodules.synthetic_world import BACKGROUND_NAMES, CHARACTER_NAMES
from datamodules.tokenizer import train_tokenizer_once

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # eos id 3: CLIP's legacy argmax pooling is for eos id 2
HEADS_FILE = "evaluator_heads.safetensors"
EXPORT_KIND = "evaluator"
HEADS = ("character_head", "background_head")


# -- tokenizer -----------------------------------------------------------------------------


def train_caption_word_tokenizer(captions: Sequence[str], max_length: int = 48) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer: the synthetic world's vocabulary is closed and tiny."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    # CLIP's text tower pools at the first eos, so every caption must end with one
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", core.token_to_id("<s>")), ("</s>", core.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def make_evaluator_tokenizer(train_jsonl: str | Path | Sequence[str | Path], out_dir: str | Path, max_length: int = 48) -> Path:
    """The evaluator's word-level tokenizer, trained on a split's captions (one jsonl file or several)."""
    return train_tokenizer_once(train_jsonl, out_dir, lambda captions: train_caption_word_tokenizer(captions, max_length),
                                "evaluator tokenizer")


# -- the evaluator network -----------------------------------------------------------------


def tiny_clip_config(
    vocab_size: int,
    image_size: int = 64,
    patch_size: int = 8,
    vision_width: int = 96,
    vision_layers: int = 3,
    text_width: int = 64,
    text_layers: int = 2,
    num_heads: int = 4,
    projection_dim: int = 64,
    max_text_length: int = 48,
) -> CLIPConfig:
    """A CLIPConfig small enough to train in CPU minutes; token ids follow SPECIAL_TOKENS."""
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_text_length,
            pad_token_id=SPECIAL_TOKENS.index("<pad>"),
            bos_token_id=SPECIAL_TOKENS.index("<s>"),
            eos_token_id=SPECIAL_TOKENS.index("</s>"),
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=num_heads,
        ),
        projection_dim=projection_dim,
    )


class StoryEvaluator(nn.Module):
    """CLIPModel + character/background heads; every input image is a [-1, 1] tensor (B, 3, H, W)."""

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        character_names: Sequence[str] = CHARACTER_NAMES,
        background_names: Sequence[str] = BACKGROUND_NAMES,
        threshold: float = 0.5,
    ):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.character_names = tuple(character_names)
        self.background_names = tuple(background_names)
        self.threshold = threshold
        dim = clip.config.projection_dim
        self.character_head = nn.Linear(dim, len(self.character_names))
        self.background_head = nn.Linear(dim, len(self.background_names))
        self.image_size = clip.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # -- encoders --------------------------------------------------------------------------

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> the CLIP view (what CLIPImageProcessor gives for uint8)."""
        x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image embeddings (B, D): what the heads read."""
        return self.clip.get_image_features(pixel_values=self.pixel_values(images)).pooler_output

    def text_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
        device = self.character_head.weight.device
        out = self.clip.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        return out.pooler_output

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (B, D): cosines for CLIP-I/-T, features for FID."""
        return F.normalize(self.image_embeddings(images), dim=-1)

    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.text_embeddings(captions), dim=-1)

    # -- heads -----------------------------------------------------------------------------

    def heads(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(character logits (B, C), background logits (B, K))."""
        return self.character_head(embeddings), self.background_head(embeddings)

    @property
    def has_labels(self) -> bool:
        """False for a plain CLIP (real data): features and CLIP scores only, no label heads."""
        return bool(self.character_names) and bool(self.background_names)

    def predict_labels(self, images: torch.Tensor) -> tuple[list[set[str]], list[str]]:
        """Characters present and background of each image, from one forward pass."""
        if not self.has_labels:
            raise ValueError("this evaluator is a plain CLIP folder and has no label heads: train one on labelled "
                             "data (configs/tiny/evaluator.yaml) to label characters and backgrounds")
        char_logits, bg_logits = self.heads(self.image_embeddings(images))
        present = torch.sigmoid(char_logits) > self.threshold
        characters = [{n for n, on in zip(self.character_names, row.tolist(), strict=True) if on} for row in present]
        backgrounds = [self.background_names[i] for i in bg_logits.argmax(-1).tolist()]
        return characters, backgrounds

    def predict_characters(self, images: torch.Tensor) -> list[set[str]]:
        return self.predict_labels(images)[0]

    def predict_background(self, images: torch.Tensor) -> list[str]:
        return self.predict_labels(images)[1]

    # -- targets ---------------------------------------------------------------------------

    def character_targets(self, characters: Sequence[Sequence[str]]) -> torch.Tensor:
        return names_to_multi_hot(characters, self.character_names).to(self.character_head.weight.device)

    def background_targets(self, backgrounds: Sequence[str]) -> torch.Tensor:
        index = {n: i for i, n in enumerate(self.background_names)}
        return torch.tensor([index[b] for b in backgrounds], device=self.character_head.weight.device)

    def image_processor(self) -> CLIPImageProcessor:
        """The processor config that reproduces :meth:`pixel_values` on uint8 images (torchmetrics' input)."""
        side = self.image_size
        return CLIPImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )


def names_to_multi_hot(characters: Sequence[Sequence[str]], names: Sequence[str]) -> torch.Tensor:
    """(B, len(names)) long multi-hot; names outside ``names`` are ignored."""
    index = {n: i for i, n in enumerate(names)}
    out = torch.zeros(len(characters), len(names), dtype=torch.long)
    for row, present in enumerate(characters):
        for name in present:
            if name in index:
                out[row, index[name]] = 1
    return out


# -- saving and loading --------------------------------------------------------------------


def save_evaluator(net: StoryEvaluator, out_dir: str | Path) -> Path:
    """The export: a ``save_pretrained`` CLIP folder (CLIPModel + CLIPProcessor) + heads (safetensors);
    label names and threshold in ``export.json``."""
    meta = {
        "character_names": list(net.character_names),
        "background_names": list(net.background_names),
        "threshold": net.threshold,
        "image_size": net.image_size,
        "input_range": [-1, 1],
    }
    with writing_export(out_dir, EXPORT_KIND, meta) as tmp:
        net.clip.save_pretrained(str(tmp))
        CLIPProcessor(image_processor=net.image_processor(), tokenizer=net.tokenizer).save_pretrained(str(tmp))
        save_tensors(tmp, HEADS_FILE, {f"{name}.{k}": v for name in HEADS for k, v in getattr(net, name).state_dict().items()})
    log.info("saved the evaluator to %s", out_dir)
    return Path(out_dir)


def load_evaluator(folder: str | Path, device: str | torch.device = "cpu") -> StoryEvaluator:
    """Load what :func:`save_evaluator` wrote, frozen and in eval mode (local files only).

    A plain ``save_pretrained`` CLIP folder (e.g. ``clip-vit-large-patch14``, the real scale's
    scorer) loads too, without label heads: FID on its features, CLIP-I, CLIP-T and consistency.
    """
    if not (Path(folder) / EXPORT_FILE).is_file() and _is_clip_folder(folder):
        clip = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        log.info("evaluator: %s is a plain CLIP folder; no character or background labels", folder)
        net = StoryEvaluator(clip, AutoTokenizer.from_pretrained(str(folder), local_files_only=True), (), ())
        return net.to(device).eval().requires_grad_(False)
    meta = read_export(folder, EXPORT_KIND)
    clip = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    net = StoryEvaluator(clip, tokenizer, meta["character_names"], meta["background_names"], meta["threshold"])
    heads = load_tensors(folder, HEADS_FILE)
    for name in HEADS:  # strict per head; anything else in the file is not ours
        getattr(net, name).load_state_dict(prefixed(heads, name))
    unexpected = [k for k in heads if not k.startswith(tuple(f"{name}." for name in HEADS))]
    if unexpected:
        raise ValueError(f"{Path(folder) / HEADS_FILE} holds tensors no head has: {unexpected}")
    return net.to(device).eval().requires_grad_(False)


def _is_clip_folder(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


class TensorFeatureCLIP(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors.

    torchmetrics 1.9's ``CLIPScore`` calls ``.norm`` on those results, but transformers 5 returns
    ``BaseModelOutputWithPooling``; this adapter is all that stands between them.
    """

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs).pooler_output


def clip_score_model(folder: str | Path) -> Callable[[], tuple[TensorFeatureCLIP, CLIPProcessor]]:
    """The ``model_name_or_path`` callable for ``torchmetrics.multimodal.CLIPScore`` over a local CLIP folder.

    torchmetrics 1.9 accepts only hub names of a fixed list as strings, so a local folder (the
    saved evaluator, or a real CLIP checkpoint) goes in through this loader.
    """
    folder = str(folder)

    def load() -> tuple[TensorFeatureCLIP, CLIPProcessor]:
        clip = CLIPModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        return TensorFeatureCLIP(clip), CLIPProcessor.from_pretrained(folder, local_files_only=True)

    return load
