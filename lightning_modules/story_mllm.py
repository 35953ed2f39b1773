"""Stage 2: the story-teller MLLM. Interleaved frames + captions -> next caption + next frame's features.

Orchestration only: the story format (tokenizer, ViT view, interleaved layout) is
:class:`datamodules.story_format.StoryFormat`, so batches arrive tokenised; LLM building and the
resamplers live in :mod:`lightning_modules.components`, the export in :mod:`lightning_modules.mllm_export`.
The loss is ``lm_weight * CE + rec_weight * regression`` (``1 - cos`` per feature token by default,
MSE optional; with a ``codebook`` the keep-or-code likelihood) on the layout of :mod:`datamodules.sequence`.

Tiny default: a small Llama pretrained on the stories' text (:mod:`lightning_modules.language_model`,
with its BPE tokenizer) and trained fully here (LoRA on a tiny network saves nothing). Real scale: Llama-2-7b from a local folder with LoRA (r 16, alpha 32) on every
projection, norms / embeddings / LM head trained, the published optimiser recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.batch import batch_size
from datamodules.exports import read_export
from datamodules.sequence import StorySequence
from datamodules.story_format import StoryFormat, StoryFormatConfig
from lightning_modules.components import sharding, story_llm
from lightning_modules.components.context_blur import blur_toward_story_mean
from lightning_modules.components.context_swap import swap_regions_within_story, token_grid_side
from lightning_modules.components.feature_codebook import CodebookConfig, FeatureCodebook, fit_codebook
from lightning_modules.components.mllm_init import EXPORT_KIND, start_from_export
from lightning_modules.components.qwen_resampler import QwenResamplerConfig
from lightning_modules.components.resamplers import ResamplerConfig, build_resampler
from lightning_modules.components.schedules import optimizer_config
from lightning_modules.components.self_read import read_own_regressions
from lightning_modules.components.sharding import FSDPSettings
from lightning_modules.components.story_llm import LLMSpec, LoRASpec
from lightning_modules.components.vision_encoder import FrozenVisionEncoder, VisionEncoderConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StoryOutputs:
    """What one teacher-forced pass produces (used by training, evaluation and stage 3)."""

    sequence: StorySequence
    logits: torch.Tensor  # (B, T, V)
    predicted_features: torch.Tensor  # (Ng, N, D) regressed at the target slots
    target_features: torch.Tensor  # (Ng, N, D) the true frames' ViT features
    previous_features: torch.Tensor | None  # (Ng, N, D) features of the frame each target edits (edit_from)
    code_logits: torch.Tensor | None = None  # (Ng, N, K + 1) keep-or-code scores (with a codebook)


class StoryMLLMModule(L.LightningModule):
    """Next-caption CE + next-frame feature regression on interleaved story chunks.

    Args:
        llm: where the LLM comes from (local folder, architecture config, or ``meta_init``).
        story_format: tokenizer folder, Q (the image slots per frame, real 64), ``supervise``
            (``last``, SEED-Story's, or ``all``: every step's caption and image in one pass) and
            the token budget ``max_length``; the datamodule encodes batches with it.
        vision_encoder: the frozen visual tokenizer, the same config as stage 1.
        input_resampler / output_resampler: a perceiver (``kind: perceiver``, the default) or
            SEED-Story's Qwen-style single attention (``kind: qwen``); the input/output widths
            and query counts are filled in from the encoder, Q and the LLM width.
        lora: LoRA settings; ``None`` trains the whole LLM (the tiny random-init default).
        rec_loss: ``cosine`` (``1 - cos`` per feature token) or ``mse``.
        residual_features: regress the change from an earlier frame's features (prediction = that
            frame + resampler output), which starts from the copy baseline, not from nothing. Off =
            SEED-Story's formulation. ``rec_loss_copy`` (logged) is the copy baseline to beat.
        queries_from_previous: the output resampler's queries start from that frame's tokens (each
            output token knows what was at its place), so the hidden states only say what changes.
        edit_from: that frame: the ``previous`` one, or the chunk's ``start`` frame (at generation the
            story's given start frame). A story reads its regressions back, so an edit of the previous
            frame inherits its fade; an edit of the true start never compounds (README, "Not there yet").
        regress_from: what the output resampler reads. ``slots`` (SEED-Story): the hidden states at
            the Q generation slots. ``step``: the step's text (opening, caption, ``<img>``) before
            them, so the caption that says what changes reaches the regression directly instead of
            only through what the LLM's attention carries into the slots, which a long story's
            context dilutes (perceiver only; measured in the README, "Not there yet").
        context_blur: in training, every frame the model reads (context and residual base) is pulled
            toward its story's mean frame by a random share in ``[0, context_blur]``; targets stay
            sharp. Generation reads back its own regressed features, which regression to the mean
            has blurred (a character half-faded where it might have moved); trained on such input,
            the model restores them instead of fading a little more at every step.
        context_swap: in training, this share of the frames the model reads (context and the edited frame)
            has one rectangle of its token grid taken from another frame of its story chunk (a character
            erased, moved or doubled; :mod:`~lightning_modules.components.context_swap`); targets stay true,
            so the model learns to mend the errors a keep-or-code story would otherwise keep. Costs no pass.
        codebook: keep-or-code (:mod:`~lightning_modules.components.feature_codebook`): every token of the
            next frame is a class, keep the edited frame's token or put one of ``size`` k-means codes
            there, trained on the labels' likelihood instead of the regression loss and decoded by argmax, so a
            generated frame holds real tokens instead of their blurred mean. Fitted on the training split
            at the start of the first ``fit``; not with ``residual_features``.
        self_read / self_read_passes: in training, this share of the frames the model reads are its
            own regressions of them, ``passes`` deep (:mod:`~lightning_modules.components.self_read`;
            needs ``supervise: all``; each pass is one more forward without gradients).
        self_read_from: the training step from which self-read applies (0: from the start). Before a
            model has learned the edits its own frames are noise; read late, its mistakes are the ones
            a generated story makes, for the true targets to mend (with keep-or-code it did not help:
            README, "Not there yet", rows R).
        init_from: a stage-2 export (this project's, or a released agent converted by
            ``python -m tools.convert agent``) whose weights the run starts from: its LoRA adapter
            with the modules trained whole (or its whole LLM when trained without LoRA) and its
            resamplers, loaded strictly into the model these settings build.
        export_dir: where ``save_mllm`` writes at the end of ``fit`` (None: not written).
        fsdp: sharding switches used under ``ModelParallelStrategy`` (mixed precision, checkpointing).
    """

    def __init__(
        self,
        llm: LLMSpec,
        story_format: StoryFormatConfig | None = None,
        vision_encoder: VisionEncoderConfig | None = None,
        input_resampler: ResamplerConfig | None = None,
        output_resampler: ResamplerConfig | None = None,
        lora: LoRASpec | None = None,
        lm_weight: float = 1.0,
        rec_weight: float = 1.0,
        rec_loss: Literal["cosine", "mse"] = "cosine",
        residual_features: bool = False,
        queries_from_previous: bool = False,
        regress_from: Literal["slots", "step"] = "slots",
        edit_from: Literal["previous", "start"] = "previous",
        context_blur: float = 0.0,
        context_swap: float = 0.0,
        self_read: float = 0.0,
        self_read_passes: int = 1,
        self_read_from: int = 0,
        codebook: CodebookConfig | None = None,
        gradient_checkpointing: bool = False,
        init_from: str | None = None,
        export_dir: str | None = None,
        fsdp: FSDPSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.fsdp = fsdp or FSDPSettings()
        self.llm_spec = llm
        self.vision_encoder = FrozenVisionEncoder(vision_encoder or VisionEncoderConfig())
        self.story_format = StoryFormat(story_format or StoryFormatConfig(), self.vision_encoder.image_size)
        num_queries = self.story_format.num_queries
        self.lora = lora
        self.lm_weight, self.rec_weight, self.rec_loss = lm_weight, rec_weight, rec_loss
        self.residual_features, self.queries_from_previous = residual_features, queries_from_previous
        if regress_from not in ("slots", "step") or (regress_from == "step" and isinstance(output_resampler, QwenResamplerConfig)):
            raise ValueError(f"regress_from is 'slots', or 'step' with the perceiver output resampler; got {regress_from!r}")
        self.regress_from = regress_from
        if edit_from not in ("previous", "start") or (edit_from == "start" and not (residual_features or queries_from_previous)):
            raise ValueError(f"edit_from is 'previous', or 'start' with residual_features or queries_from_previous; got {edit_from!r}")
        self.edit_from = edit_from
        self.context_blur = context_blur
        if not 0.0 <= context_swap <= 1.0:
            raise ValueError(f"context_swap is a share of the frames read, in [0, 1]; got {context_swap}")
        self.context_swap = context_swap
        if self_read > 0 and self.story_format.config.supervise != "all":
            raise ValueError("self_read needs story_format.supervise: all (the first pass must regress every frame)")
        self.self_read, self.self_read_passes = self_read, self_read_passes
        if self_read_from < 0:
            raise ValueError(f"self_read_from is a training step (>= 0); got {self_read_from}")
        self.self_read_from = self_read_from
        if codebook is not None and residual_features:
            raise ValueError("codebook decodes whole tokens (keep or code): set residual_features: false")
        self.gradient_checkpointing = gradient_checkpointing
        if init_from is not None:
            read_export(init_from, EXPORT_KIND)  # a wrong path fails here, before anything is built
        self.init_from = init_from
        self.export_dir = export_dir
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

        width = story_llm.llm_architecture(self.llm_spec).hidden_size
        encoder = self.vision_encoder
        self.input_resampler = build_resampler(input_resampler, encoder.dim, num_queries, width)
        self.output_resampler = build_resampler(output_resampler, width, encoder.num_tokens, encoder.dim,
                                                query_input_dim=encoder.dim if queries_from_previous else 0)
        self.codebook = FeatureCodebook(codebook, encoder.dim) if codebook is not None else None
        if context_swap > 0:
            token_grid_side(encoder.num_tokens)  # a tokenizer without a square token grid fails here
        self.llm: nn.Module | None = None
        self.base_vocab_size: int | None = None

    # -- building --------------------------------------------------------------------------

    @property
    def num_queries(self) -> int:
        return self.story_format.num_queries

    def configure_model(self) -> None:
        """Build the LLM for the format's tokenizer (late, so FSDP can shard and ``meta`` stays cheap)."""
        if self.llm is not None:
            return
        fmt = self.story_format
        has_tokenizer = fmt.has_tokenizer()
        if not has_tokenizer and not self.llm_spec.meta_init:
            fmt.prepare([])  # raises, naming the folder and the fix
        # a config-built LLM takes the tokenizer's base vocabulary; a loaded one keeps its own
        from_config = self.llm_spec.path is None and has_tokenizer
        model = story_llm.build_llm(self.llm_spec, vocab_size=fmt.tokenizer.vocab_size if from_config else None)
        self.base_vocab_size = model.get_input_embeddings().weight.shape[0]
        # meta_init without tokenizer files (shape checks): the Q + 2 story tokens a tokenizer would add
        story_llm.grow_vocabulary(model, len(fmt.tokenizer) if has_tokenizer else self.base_vocab_size + self.num_queries + 2)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.lora is not None:
            model = story_llm.add_lora(model, self.lora)
        self.llm = model
        if self.init_from is not None:
            start_from_export(self, self.init_from)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
            self.shard(self.device_mesh, self.fsdp)

    def shard(self, mesh, settings: FSDPSettings) -> None:
        """FSDP2 over ``mesh``, this module the root (units: :func:`~lightning_modules.components.sharding.mllm_units`).
        Stage 2 shards itself here; stage 3 shards its frozen copy the same way."""
        self.ensure_built()
        sharding.shard(sharding.mllm_units(self), [self], mesh, settings)

    @property
    def base_llm(self) -> nn.Module:
        """The causal LM under any PEFT wrapper (its ``.model`` and ``.lm_head`` are the live ones)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def ensure_built(self) -> None:
        if self.llm is None:
            self.configure_model()

    # -- the teacher-forced pass ----------------------------------------------------------

    def story_features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT features of every real frame, and a (B, T) map from frame to row of those features."""
        mask = batch["frame_mask"]
        features = self.vision_encoder(batch["vit_pixels"][mask])
        index = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        index[mask] = torch.arange(int(mask.sum()), device=mask.device)
        return features, index

    def sequence_of(self, batch: dict[str, Any]) -> StorySequence:
        """The batch's laid-out sequence, on this module's device."""
        # batches from the DataLoader arrive laid out; others (tools, tests) are laid out here, the same way
        seq = batch["sequence"] if "sequence" in batch else self.story_format.encode_batch(batch["captions"])
        return seq.to(self.device)

    def forward_story(self, batch: dict[str, Any], features: torch.Tensor | None = None,
                      feature_index: torch.Tensor | None = None) -> StoryOutputs:
        self.ensure_built()
        if features is None:
            features, feature_index = self.story_features(batch)
        seq = self.sequence_of(batch)
        read = None
        if self.training and self.context_blur > 0 and "story_id" in batch:
            read = blur_toward_story_mean(features, feature_index, batch["story_id"], batch["frame_index"],
                                          self.context_blur, seed=self.global_step)
        if self.training and self.context_swap > 0 and "story_id" in batch:
            read = swap_regions_within_story(features if read is None else read, feature_index, batch["story_id"],
                                             batch["frame_index"], self.context_swap, seed=1, step=self.global_step)
        if self.training and self.self_read > 0 and self.global_step >= self.self_read_from and "story_id" in batch:
            read = read_own_regressions(self, seq, features, feature_index, read, batch)
        # one call through forward(): under FSDP the module is the root unit and must run first
        logits, predicted, previous, target, code_logits = self(seq, features, feature_index, read)
        return StoryOutputs(seq, logits, predicted, target, previous, code_logits)

    def forward(self, seq: StorySequence, features: torch.Tensor, feature_index: torch.Tensor,
                read_features: torch.Tensor | None = None):
        """Teacher-forced pass over a laid-out batch: logits, regressed, previous and true features, and the
        keep-or-code scores (None without a codebook).

        ``read_features`` (same rows as ``features``) replace them where the model *reads* frames
        (context slots, residual base); the targets stay the true ``features``.
        """
        targets = features
        features = features if read_features is None else read_features
        base = self.base_llm
        embeds = base.get_input_embeddings()(seq.input_ids)
        width = embeds.shape[-1]
        if len(seq.context_frames):
            rows = feature_index[seq.context_frames[:, 0], seq.context_frames[:, 1]]
            context = self.input_resampler(features[rows].to(embeds.dtype))
            embeds = embeds.reshape(-1, width).index_copy(0, seq.context_slots.flatten(), context.reshape(-1, width).to(embeds.dtype))
            embeds = embeds.view(seq.input_ids.shape[0], -1, width)
        hidden = base.model(inputs_embeds=embeds, attention_mask=seq.attention_mask, position_ids=seq.position_ids,
                            use_cache=False).last_hidden_state
        logits = base.lm_head(hidden)
        queries = hidden.reshape(-1, width)[seq.target_slots.flatten()].view(len(seq.target_frames), self.num_queries, width)
        target_rows = feature_index[seq.target_frames[:, 0], seq.target_frames[:, 1]]
        frames = seq.target_frames[:, 1]
        edited = (frames - 1).clamp(min=0) if self.edit_from == "previous" else torch.zeros_like(frames)
        previous = features[feature_index[seq.target_frames[:, 0], edited]].float()
        step_text = None  # gathered only where the output resampler reads it
        if self.regress_from == "step":
            step_text = hidden.reshape(-1, width)[seq.target_text.flatten()].view(*seq.target_text.shape, width).float()
        regressed, code_logits = self.regress_scored(queries.float(), previous, step_text, seq.target_text_mask)
        return logits, regressed, previous, targets[target_rows].float(), code_logits

    def regress(self, queries: torch.Tensor, previous: torch.Tensor, step_text: torch.Tensor | None = None,
                step_text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Features of the next frame from the hidden states at its Q generation slots ``(B, Q, H)`` (and,
        with ``regress_from: step``, at its step's text ``(B, L, H)``, its mask False where padded)."""
        return self.regress_scored(queries, previous, step_text, step_text_mask)[0]

    def regress_scored(self, queries: torch.Tensor, previous: torch.Tensor, step_text: torch.Tensor | None = None,
                       step_text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`regress`, and with a codebook the keep-or-code scores its features are decoded from."""
        masked = {}
        if self.regress_from == "step":  # the output resampler reads the step's text, then the slots
            if step_text_mask is not None:
                masked["mask"] = torch.cat([step_text_mask.to(queries.device),
                                            queries.new_ones(queries.shape[:2], dtype=torch.bool)], dim=1)
            queries = torch.cat([step_text.to(queries.dtype), queries], dim=1)
        out = self.output_resampler(queries, query_features=previous if self.queries_from_previous else None, **masked)
        if self.codebook is not None:
            scores = self.codebook.logits(out)
            return self.codebook.decode(previous, scores.argmax(-1)), scores
        return (previous + out if self.residual_features else out), None

    def losses(self, out: StoryOutputs) -> dict[str, torch.Tensor]:
        ce, accuracy = story_llm.next_token_loss(out.logits, out.sequence.labels)
        cos = F.cosine_similarity(out.predicted_features, out.target_features, dim=-1).mean()
        rec = self._regression_loss(out.predicted_features, out.target_features)
        with torch.no_grad():
            rec_copy = self._regression_loss(out.previous_features, out.target_features)  # "next = the edited frame"
        terms = {"lm_loss": ce, "rec_loss": rec, "rec_loss_copy": rec_copy, "token_acc": accuracy, "feature_cos": cos.detach()}
        image_loss = rec
        if self.codebook is not None:  # the decoded features carry no gradient: the classes are trained
            image_loss, terms["code_acc_changed"] = self.codebook.loss(out.code_logits, out.previous_features,
                                                                         out.target_features)
            terms["code_loss"], terms["rec_loss"] = image_loss, rec.detach()
        return {"loss": self.lm_weight * ce + self.rec_weight * image_loss, **terms}

    def _regression_loss(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.rec_loss == "cosine":
            return 1 - F.cosine_similarity(predicted, target, dim=-1).mean()
        return F.mse_loss(predicted, target)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        if batch_size(batch) == 0:
            return None
        out = self.forward_story(batch)
        terms = self.losses(out)
        n = batch_size(batch)
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, batch_size=n, prog_bar=name in ("loss", "token_acc"),
                     sync_dist=stage != "train", on_step=stage == "train", on_epoch=stage != "train")
        for name in ("dropped_steps", "truncated_captions"):  # what the token budget cut
            if getattr(out.sequence, name):
                self.log(f"{stage}/{name}", float(getattr(out.sequence, name)), batch_size=n, reduce_fx="sum")
        return terms["loss"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    # -- optimisation ------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        self.ensure_built()
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        return optimizer_config(self.trainable_parameters(), self.optimizer_factory, self.scheduler_factory)

    def on_fit_start(self) -> None:
        """Fit the codebook on the training split's frames, once (a resumed or ``init_from`` run has its codes)."""
        if self.codebook is None or bool(self.codebook.fitted):
            return
        if not hasattr(self.trainer.datamodule, "single_rank_train_loader"):
            raise ValueError("codebook: fit with the StoryStream datamodule (the codes are fitted on its training split), "
                             "or start from an export that has them (init_from)")
        if self.trainer.is_global_zero:
            with torch.random.fork_rng(devices=[]), torch.no_grad():  # leaves the training's random stream as it was
                frames = (self.vision_encoder(b["vit_pixels"][b["frame_mask"]].to(self.device))
                          for b in self.trainer.datamodule.single_rank_train_loader())
                fitted_on = fit_codebook(self.codebook, frames)
            log.info("codebook: %d codes fitted on %d training tokens", self.codebook.config.size, fitted_on)
        codes = self.trainer.strategy.broadcast(self.codebook.codes.cpu(), src=0)  # every rank the same codes
        self.codebook.set_codes(codes.to(self.codebook.codes.device))

    def on_fit_end(self) -> None:
        sharding.export_at_fit_end(self, self.export_dir)

    def export(self, directory: str | Path) -> Path:
        """peft adapter (or full LLM), resamplers as safetensors, tokenizer and ``export.json``."""
        from lightning_modules.mllm_export import save_mllm  # the export module builds on this one

        return save_mllm(self, directory)
