"""Stories from the trained pipeline: ``predict`` writes them, ``test`` scores them.

The stage-2 MLLM writes, the (stage-3) de-tokenizer draws, both loaded from their exports and
frozen; nothing trains here. ``predict_step`` generates a story per sample (start frames from the
batch) with the :class:`~lightning_modules.components.story_generator.StoryGenerator` and writes
each into ``output_dir``: frames as PNG, ``story.json`` and ``storyboard.html``. With
``evaluator_dir``, every frame is also labelled by the evaluator (in ``story.json``) and
``retention.json`` gives, per step, how much of the start frame's cast and background the stories
keep; in the synthetic world, ``judge.json`` rates style, coherence and engagement exactly
(:mod:`evaluation.judge`). ``test`` runs the visualization protocol of :mod:`evaluation.protocol` on the test split and
writes ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.batch import batch_size
from datamodules.frozen import Frozen
from datamodules.images import UnreadableImage
from datamodules.story_format import StoryFormat
from datamodules.synthetic_world import BACKGROUND_NAMES
from evaluation.evaluator import load_evaluator
from evaluation.judge import distinct_share, judge_story, summarize
from evaluation.protocol import metric_table, score_story, write_metrics
from evaluation.retention import StartCastRetention, retention_table
from evaluation.story_metrics import StoryMetrics
from lightning_modules.components.story_generator import GenerationSettings, Story, StoryGenerator
from lightning_modules.components.storyboard import write_story
from lightning_modules.detokenizer import DetokenizerModule, load_detokenizer
from lightning_modules.detokenizer_adaptation import check_export_dirs
from lightning_modules.mllm_export import exported_story_format, load_mllm
from lightning_modules.story_mllm import StoryMLLMModule

log = logging.getLogger(__name__)


class StoryGenerationModule(L.LightningModule):
    """A frozen MLLM + de-tokenizer pair that generates (``predict``) and scores (``test``) stories.

    Args:
        detokenizer_dir: a ``save_detokenizer`` folder (stage 3's export, or stage 1's for the ablation).
        mllm_dir: a ``save_mllm`` folder (stage 2's export).
        generation: story generation settings (steps, decoding, sampler, context policy).
        start_frames: how many frames of each predict sample start the story.
        output_dir: where ``predict`` writes the stories and ``test`` its ``metrics.json``.
        evaluator_dir: the story evaluator (a ``save_evaluator`` folder): ``test`` scores with it, and
            ``predict`` labels every frame with it and writes ``retention.json``.
        inception_weights_path: local Inception weights for FID at real scale (else evaluator features).
        test_steps: ``test`` draws this many frames after each test story's first frame, from the
            true captions, and scores them against the true frames.
    """

    def __init__(
        self,
        detokenizer_dir: str,
        mllm_dir: str,
        generation: GenerationSettings | None = None,
        start_frames: int = 1,
        output_dir: str = "runs/stories",
        evaluator_dir: str | None = None,
        inception_weights_path: str | None = None,
        test_steps: int = 9,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_export_dirs(detokenizer_dir=detokenizer_dir, mllm_dir=mllm_dir)
        self.detokenizer_dir, self.mllm_dir = detokenizer_dir, mllm_dir
        self.generation = generation or GenerationSettings()
        self.start_frames = start_frames
        self.output_dir = output_dir
        self.evaluator_dir = evaluator_dir
        self.inception_weights_path = inception_weights_path
        self.test_steps = test_steps
        # start frames are read through the MLLM's ViT view; the text is written, not read
        self.story_format = StoryFormat(None, exported_story_format(mllm_dir).vit_image_size)
        self.frozen_parts: Frozen | None = None
        self.story_metrics: StoryMetrics | None = None
        self._retention: StartCastRetention | None = None  # during predict, when evaluator_dir is given
        self.labeller: Frozen | None = None  # the evaluator that labels predicted frames
        self.stories_written: list[Path] = []
        self._judged: list[dict[str, list]] = []  # the judge's per-step reading of each story (this rank)

    def configure_model(self) -> None:
        if self.frozen_parts is not None:
            return
        parts = torch.nn.ModuleDict({"mllm": load_mllm(self.mllm_dir), "detokenizer": load_detokenizer(self.detokenizer_dir)})
        # offload: the parts wait in CPU memory, and the generator brings each to the device in turn
        self.frozen_parts = Frozen(parts, follow_owner=not self.generation.offload).to(self.device)

    @property
    def mllm(self) -> StoryMLLMModule:
        return self.frozen_parts.net["mllm"]

    @property
    def detokenizer(self) -> DetokenizerModule:
        return self.frozen_parts.net["detokenizer"]

    # -- generation ------------------------------------------------------------------------

    def story_generator(self, settings: GenerationSettings | None = None) -> StoryGenerator:
        self.configure_model()
        if self.generation.offload:  # the parts ignore the module's .to(): they take its dtype here (bf16-true)
            for part in (self.mllm, self.detokenizer):
                part.to(dtype=self.dtype)
        return StoryGenerator(self.mllm, self.detokenizer, settings or self.generation, self.device)

    def generate_story(self, vit_pixels: torch.Tensor, captions: list[str], images: torch.Tensor | None = None,
                       given_captions: list[str] | None = None, settings: GenerationSettings | None = None) -> Story:
        """Continue (or visualize, with ``given_captions``) a story: the notebook's and the protocol's entry."""
        return self.story_generator(settings).generate(vit_pixels, captions, captions=given_captions, start_images=images)

    def on_predict_start(self) -> None:
        """With ``evaluator_dir``, label every frame of every story to measure what it keeps of its start."""
        self._retention, self._judged = None, []
        if self.evaluator_dir and Path(self.evaluator_dir).is_dir():
            evaluator = load_evaluator(self.evaluator_dir, self.device)
            if not evaluator.has_labels:
                log.info("predict: %s has no label heads; stories are written without labels, retention or judge",
                         self.evaluator_dir)
                return
            self.labeller = Frozen(evaluator)
            self._retention = StartCastRetention(self.start_frames + self.generation.steps).to(self.device)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        results = []
        for row in range(batch_size(batch)):
            k = min(self.start_frames, int(batch["num_frames"][row]))
            # each story samples with its own seed: with one seed for all, every story would draw the same
            # random numbers, and stories in similar states would write the same events at the same steps
            settings = dataclasses.replace(self.generation, seed=story_seed(self.generation.seed, batch["story_id"][row]))
            story = self.generate_story(batch["vit_pixels"][row, :k], batch["captions"][row][:k], batch["pixels"][row, :k],
                                        settings=settings)
            folder = Path(self.output_dir) / f"story_{batch['story_id'][row]}"
            info = {"story_id": batch["story_id"][row], **story.summary(),
                    "detokenizer_dir": self.detokenizer_dir, "mllm_dir": self.mllm_dir}
            if self._retention is not None:
                info["evaluator_labels"] = labels = self._label_story(story, batch, row)
                truth, background = batch["characters"][row], batch["background"][row]
                if labels and truth is not None and background in BACKGROUND_NAMES:  # the synthetic world
                    start = int(batch["frame_index"][row, 0])
                    info["truth"] = {"start_characters": truth[0], "background": background, "start_frame": start}
                    info["judge"] = judged = judge_story(story.captions, labels, truth[0], background)
                    self._judged.append({**judged, "story_id": batch["story_id"][row], "start_frame": start})
            write_story(folder, f"story {batch['story_id'][row]}", story.captions,
                        [s.image for s in story.steps], [s.given for s in story.steps], info)
            self.stories_written.append(folder)
            results.append({"story_id": batch["story_id"][row], "folder": str(folder), "captions": story.captions})
        return results

    def _label_story(self, story: Story, batch: dict[str, Any], row: int) -> list[dict[str, Any]]:
        """The evaluator's characters and background for every frame; updates the retention metric."""
        images = [s.image for s in story.steps]
        if any(image is None for image in images):
            return []
        labels = self._evaluator_labels(torch.stack(images))
        truth = batch["characters"][row]
        if truth is not None and batch["background"][row] is not None:
            self._retention.update([label["characters"] for label in labels], [label["background"] for label in labels],
                                   truth[0], batch["background"][row])
        return labels

    def _evaluator_labels(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """The evaluator's ``{"characters" (sorted), "background"}`` of each image of ``(n, 3, S, S)`` in [-1, 1]."""
        characters, backgrounds = self.labeller.net.predict_labels(images.to(self.device).float())
        return [{"characters": sorted(c), "background": b} for c, b in zip(characters, backgrounds, strict=True)]

    def on_predict_end(self) -> None:
        if self._retention is None:
            return
        scores = self._retention.compute()  # synced: every rank calls it, whatever it scored itself
        if len(scores["stories"]) and self.trainer.is_global_zero:
            path = Path(self.output_dir) / "retention.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({name: value.tolist() for name, value in scores.items()} | {
                "evaluator_dir": self.evaluator_dir, "detokenizer_dir": self.detokenizer_dir, "mllm_dir": self.mllm_dir}, indent=2))
            print(f"what the stories keep of their start frame ({path}):\n{retention_table(scores)}")
        self._write_judgement()

    def _write_judgement(self) -> None:
        """``judge.json`` over every rank's stories, and its headline numbers to the loggers."""
        judged = self._judged
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list[list] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, judged)
            judged = [j for rank in every for j in rank]
        if not judged or not self.trainer.is_global_zero:
            return
        summary = summarize(judged) | self._real_references(judged)
        path = Path(self.output_dir) / "judge.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary | {"detokenizer_dir": self.detokenizer_dir, "mllm_dir": self.mllm_dir}, indent=2))
        headline = {k: v for k, v in summary.items() if isinstance(v, float)}
        for logger in self.loggers:
            logger.log_metrics({f"judge/{k}": v for k, v in headline.items()})
        print(f"the judge ({path}): " + ", ".join(f"{k} {v:.3f}" for k, v in headline.items()))

    def _real_references(self, judged: list[dict]) -> dict[str, float]:
        """The judge's references: the true stories over the frames each judged story covers (the predict
        split's records, as the datamodule read them), their captions' ``real_distinct_consecutive`` and,
        with their frames read by the same evaluator, their ``real_coherence_f1`` (steps >= 1, as
        ``coherence_f1``). A story whose true frames cannot be read is left out of the second."""
        dataset = getattr(getattr(self.trainer, "datamodule", None), "datasets", {}).get("predict")
        if dataset is None:
            return {}
        index = {r.story_id: i for i, r in enumerate(dataset.stories)}
        covered = [(i, range(j["start_frame"], min(j["start_frame"] + len(j["coherence"]), len(dataset.stories[i]))))
                   for j in judged if (i := index.get(j["story_id"])) is not None]
        if not covered:
            return {}
        out = {"real_distinct_consecutive": distinct_share([[dataset.stories[i].captions[f] for f in span] for i, span in covered])}
        real = []
        for i, span in covered:
            try:
                frames = dataset.load_frames(i, span)
            except UnreadableImage as error:
                log.warning("judge: story %s has an unreadable true frame (%s); left out of real_coherence_f1",
                            dataset.stories[i].story_id, error)
                continue
            if frames["characters"] is None or len(frames["captions"]) < 2:
                continue
            labels = self._evaluator_labels(frames["pixels"])
            real.append(judge_story(frames["captions"], labels, frames["characters"][0], frames["background"]))
        if real:
            out["real_coherence_f1"] = summarize(real)["coherence_f1"]
        return out

    # -- standalone evaluation -------------------------------------------------------------

    def on_test_start(self) -> None:
        if not self.evaluator_dir or not Path(self.evaluator_dir).is_dir():
            raise FileNotFoundError(f"evaluator_dir: {self.evaluator_dir} is not a folder; train the evaluator "
                                    "(configs/tiny/evaluator.yaml) or point evaluator_dir at one")
        self.story_metrics = StoryMetrics.from_folder(self.evaluator_dir, self.inception_weights_path).to(self.device)
        dataset = self.trainer.datamodule.datasets["test"]
        self._test_index = {story.story_id: i for i, story in enumerate(dataset.stories)}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        dataset = self.trainer.datamodule.datasets["test"]
        for row in range(batch_size(batch)):
            # the protocol: each test story's first frame, then its next test_steps frames
            frames = dataset.load_frames(self._test_index[batch["story_id"][row]], range(1 + self.test_steps))
            if not score_story(self, self.story_metrics, frames):
                log.warning("test: story %s has a single frame, nothing to draw; not scored", batch["story_id"][row])

    def on_test_epoch_end(self) -> None:
        scores = self.story_metrics.compute()
        self.story_metrics.reset()
        for name, value in scores.items():
            self.log(f"test/{name}", value)
        if self.trainer.is_global_zero:
            path = write_metrics(self.output_dir, scores, {"detokenizer_dir": self.detokenizer_dir, "mllm_dir": self.mllm_dir,
                                                           "evaluator_dir": self.evaluator_dir, "test_steps": self.test_steps})
            log.info("test metrics (%s):\n%s", path, metric_table(scores))


def story_seed(seed: int, story_id: str) -> int:
    """The sampling seed of one story in ``predict``: stable across runs and machines (not Python's
    salted ``hash``), and different for every story id."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{story_id}".encode()).digest()[:4], "big")
