"""Story-visualisation metrics as torchmetrics objects (FID, CLIP-T, CLIP-I, consistency, character F1, ...).

The protocol is StoryDALL-E / StoryGPT-V's: FID on frame features, character F1 (micro) and
frame accuracy (exact match of the character set) and background accuracy from classifiers
trained on the dataset itself, plus CLIP-T (frame vs its caption) and CLIP-I (frame vs its
ground-truth frame). Every image is a [-1, 1] tensor (B, 3, H, W), the batch contract's ``pixels``.

Which feature network FID uses is in its logged name: ``fid_evaluator`` (the small evaluator of
:mod:`evaluation.evaluator`, the embedded default; not comparable with published FIDs)
or ``fid_inception`` (Inception-v3 from a local ``feature_extractor_weights_path``, real scale).

Every state has a ``dist_reduce_fx`` (sums, or ``cat`` for per-frame features), so values are the
same whether frames were scored on one process or split across several.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelExactMatch, MultilabelF1Score
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal import CLIPScore
from torchmetrics.utilities import dim_zero_cat

from datamodules.frozen import hold_frozen
from evaluation.evaluator import clip_score_model, load_evaluator, names_to_multi_hot

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """What the metrics need from an evaluator (:class:`evaluation.evaluator.StoryEvaluator`)."""

    character_names: tuple[str, ...]
    background_names: tuple[str, ...]
    has_labels: bool  # False: features only (a plain CLIP); the label metrics are left out

    def image_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def predict_labels(self, images: torch.Tensor) -> tuple[list[set[str]], list[str]]: ...


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255]: the input torchmetrics' FID (Inception) and CLIPScore expect."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


# -- FID -----------------------------------------------------------------------------------


class EvaluatorFeatureExtractor(nn.Module):
    """FID's ``feature`` module: uint8 images -> the evaluator's normalised image features."""

    def __init__(self, evaluator: Scorer, num_features: int):
        super().__init__()
        self.num_features = num_features  # spares torchmetrics its 299x299 dummy forward
        hold_frozen(self, "evaluator", evaluator)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        evaluator = self.evaluator.to(images.device)
        return evaluator.image_features(images.float() / 127.5 - 1.0).double()


class StoryFID(FrechetInceptionDistance):
    """FID of [-1, 1] frames on evaluator features (``fid_evaluator``) or local Inception weights (``fid_inception``)."""

    def __init__(self, evaluator: Scorer | None = None, inception_weights_path: str | None = None, **kwargs: Any):
        if (evaluator is None) == (inception_weights_path is None):
            raise ValueError("give exactly one of evaluator (tiny) or inception_weights_path (real scale)")
        if evaluator is not None:
            dim = int(evaluator.image_features(torch.zeros(1, 3, 8, 8)).shape[-1])
            super().__init__(feature=EvaluatorFeatureExtractor(evaluator, dim), **kwargs)
            self.label = "fid_evaluator"
        else:
            if not Path(inception_weights_path).is_file():
                raise FileNotFoundError(
                    f"inception_weights_path {inception_weights_path} is not a file (nothing is downloaded)"
                )
            super().__init__(feature=2048, feature_extractor_weights_path=inception_weights_path, **kwargs)
            self.label = "fid_inception"

    def update(self, images: torch.Tensor, real: bool) -> None:  # type: ignore[override]
        super().update(to_uint8(images), real=real)


# -- CLIP-T, CLIP-I, story consistency -----------------------------------------------------


class CLIPTextAlignment(CLIPScore):
    """CLIP-T: mean cosine of each frame with its caption, ``max(mean, 0)`` (torchmetrics' CLIPScore / 100).

    ``clip_folder`` is any local CLIP ``save_pretrained`` folder: the saved evaluator, or real CLIP.
    """

    def __init__(self, clip_folder: str | Path, **kwargs: Any):
        super().__init__(model_name_or_path=clip_score_model(clip_folder), **kwargs)
        hold_frozen(self, "model", self.model)

    def update(self, images: torch.Tensor, captions: Sequence[str]) -> None:  # type: ignore[override]
        with torch.no_grad():
            super().update(list(to_uint8(images)), list(captions))

    def compute(self) -> torch.Tensor:
        return super().compute() / 100.0


class CosineSimilarity(Metric):
    """CLIP-I: mean cosine between paired feature rows (generated frame vs its ground-truth frame)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.total += F.cosine_similarity(preds.double(), target.double(), dim=-1).sum()
        self.count += preds.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


def story_key(story_id: str | int) -> int:
    """A stable int64 for a story id (ids are strings; states must be tensors)."""
    text = str(story_id).encode()
    return (zlib.crc32(text) << 31) ^ zlib.adler32(text)


class StoryConsistency(Metric):
    """Mean over stories of the mean pairwise cosine between that story's frames.

    Frames are kept (``cat`` states) until ``compute``, so one story may span batches and ranks.
    Stories with a single frame have no pair and are left out.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("stories", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, story_ids: Sequence[str | int]) -> None:
        self.features.append(F.normalize(features.double(), dim=-1))
        self.stories.append(torch.tensor([story_key(s) for s in story_ids], dtype=torch.long, device=features.device))

    def compute(self) -> torch.Tensor:
        if isinstance(self.features, list) and not self.features:  # after a sync the states are tensors
            return torch.tensor(float("nan"))
        features, stories = dim_zero_cat(self.features), dim_zero_cat(self.stories)
        per_story = []
        for key in stories.unique():
            f = features[stories == key]
            n = f.shape[0]
            if n < 2:
                continue
            sim = f @ f.T
            per_story.append((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
        if not per_story:
            return torch.tensor(float("nan"))
        return torch.stack(per_story).mean().float()


# -- label metrics from the evaluator's heads ----------------------------------------------


class CharacterF1(MultilabelF1Score):
    """Micro F1 of the predicted character sets against the true ones."""

    def __init__(self, names: Sequence[str], **kwargs: Any):
        super().__init__(num_labels=len(names), average="micro", **kwargs)
        self.names = tuple(names)

    def update(self, preds: Sequence[Sequence[str]], target: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        super().update(
            names_to_multi_hot(preds, self.names).to(self.device),
            names_to_multi_hot(target, self.names).to(self.device),
        )


class FrameAccuracy(MultilabelExactMatch):
    """Share of frames whose predicted character set equals the true set exactly."""

    def __init__(self, names: Sequence[str], **kwargs: Any):
        super().__init__(num_labels=len(names), **kwargs)
        self.names = tuple(names)

    def update(self, preds: Sequence[Sequence[str]], target: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        super().update(
            names_to_multi_hot(preds, self.names).to(self.device),
            names_to_multi_hot(target, self.names).to(self.device),
        )


class BackgroundAccuracy(MulticlassAccuracy):
    """Share of frames whose predicted background is the true one."""

    def __init__(self, names: Sequence[str], **kwargs: Any):
        super().__init__(num_classes=len(names), average="micro", **kwargs)
        self.index = {n: i for i, n in enumerate(names)}

    def update(self, preds: Sequence[str], target: Sequence[str]) -> None:  # type: ignore[override]
        as_index = lambda names: torch.tensor([self.index[n] for n in names], dtype=torch.long, device=self.device)  # noqa: E731
        super().update(as_index(preds), as_index(target))


# -- the collection ------------------------------------------------------------------------


class StoryMetrics(nn.Module):
    """All story metrics over generated frames; runs the evaluator once per update.

    Args:
        evaluator: the scorer (features and label heads), kept frozen and out of ``parameters()``.
        clip_folder: local CLIP folder for CLIP-T (e.g. the saved evaluator); None skips CLIP-T.
        inception_weights_path: a local Inception-v3 file; FID then uses it (``fid_inception``)
            instead of the evaluator's features (``fid_evaluator``).
    """

    def __init__(
        self, evaluator: Scorer, clip_folder: str | Path | None = None, inception_weights_path: str | None = None
    ):
        super().__init__()
        hold_frozen(self, "evaluator", evaluator)
        if inception_weights_path:
            fid = StoryFID(inception_weights_path=inception_weights_path)
        else:
            fid = StoryFID(evaluator=evaluator)
        metrics: dict[str, Metric] = {
            fid.label: fid,
            "clip_i": CosineSimilarity(),
            "story_consistency": StoryConsistency(),
        }
        if evaluator.has_labels:
            metrics |= {"character_f1": CharacterF1(evaluator.character_names),
                        "frame_accuracy": FrameAccuracy(evaluator.character_names),
                        "background_accuracy": BackgroundAccuracy(evaluator.background_names)}
        if clip_folder is not None:
            metrics["clip_t"] = CLIPTextAlignment(clip_folder)
        self.metrics = nn.ModuleDict(metrics)
        self.fid_name = fid.label

    @classmethod
    def from_folder(cls, evaluator_dir: str | Path, inception_weights_path: str | None = None) -> StoryMetrics:
        """The embedded default: the saved evaluator scores everything, CLIP-T included."""
        return cls(
            load_evaluator(evaluator_dir), clip_folder=evaluator_dir, inception_weights_path=inception_weights_path
        )

    @torch.no_grad()
    def update(
        self,
        generated_images: torch.Tensor,
        true_images: torch.Tensor,
        captions: Sequence[str],
        true_characters: Sequence[Sequence[str] | None] | None,
        true_background: Sequence[str | None] | None,
        story_ids: Sequence[str | int],
    ) -> None:
        """One row per frame (flatten stories first); ground-truth labels may be None (not synthetic)."""
        evaluator = self.evaluator.to(generated_images.device)
        gen_features = evaluator.image_features(generated_images)
        true_features = evaluator.image_features(true_images)
        m = self.metrics
        m[self.fid_name].update(true_images, real=True)
        m[self.fid_name].update(generated_images, real=False)
        m["clip_i"].update(gen_features, true_features)
        m["story_consistency"].update(gen_features, story_ids)
        if "clip_t" in m:
            m["clip_t"].update(generated_images, captions)
        if not evaluator.has_labels:
            return
        pred_chars, pred_bgs = evaluator.predict_labels(generated_images)
        if true_characters is not None:
            keep = [i for i, c in enumerate(true_characters) if c is not None]
            if keep:
                m["character_f1"].update([pred_chars[i] for i in keep], [true_characters[i] for i in keep])
                m["frame_accuracy"].update([pred_chars[i] for i in keep], [true_characters[i] for i in keep])
        if true_background is not None:
            keep = [i for i, b in enumerate(true_background) if b is not None]
            if keep:
                m["background_accuracy"].update([pred_bgs[i] for i in keep], [true_background[i] for i in keep])

    def compute(self) -> dict[str, float]:
        """Every metric that saw data, as floats (label metrics absent without ground truth)."""
        out = {}
        for name, metric in self.metrics.items():
            if metric.update_count == 0:
                continue
            out[name] = float(metric.compute())
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
