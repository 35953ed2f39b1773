"""Long multimodal story generation: the stage-2 MLLM writes, the de-tokenizer draws.

Each step: decode the caption after the step separator (greedy by default; or force a given
caption in visualization mode), then ``<img>``, the Q generation slots and the regression of the
frame's features from their hidden states; the de-tokenizer draws the image; the regressed
features (or, optionally, a re-encoding of the drawn image) become the next context frame.

Context policies (``ContextPolicy.mode``):

- ``dense``: the whole story stays in the KV cache, reused across steps.
- ``window``: what SEED-Story's released script does: each step re-encodes the last
  ``window_frames`` frames from scratch (no cache reuse).
- ``sink``: the multimodal attention sink of :mod:`~lightning_modules.components.attention_sink`,
  cache reused across steps, evicted entries freed, positions kept contiguous.

``GenerationSettings.offload`` fits one GPU: the MLLM writes the whole story, then the de-tokenizer
draws it, each on the device only for its phase (:mod:`~lightning_modules.components.placement`);
every frame keeps its own noise seed, so the story is the one the plain path draws.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from lightning_modules.components import attention_sink as sink
from lightning_modules.components import sharding
from lightning_modules.components.caption_decoding import DecodeSettings, pick_token
from lightning_modules.components.placement import Placement
from lightning_modules.components.sampling import Sampler


@dataclass
class ContextPolicy:
    mode: Literal["dense", "window", "sink"] = "sink"
    window_frames: int = 8  # window mode: how many recent frames are re-encoded each step
    sink: sink.SinkSettings = field(default_factory=sink.SinkSettings)


@dataclass
class GenerationSettings:
    steps: int = 25
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    num_inference_steps: int | None = None  # None: the de-tokenizer's default
    guidance_scale: float | None = None
    sampler: Sampler = "euler"  # or "dpmpp": DPM-Solver++, the same image in far fewer steps (20-25)
    context: ContextPolicy = field(default_factory=ContextPolicy)
    # the next step reads the ViT features of the drawn image (context and residual base) instead of
    # the regressed ones (the idea: drawing snaps a blurred regression back onto an image; on the tiny
    # pipeline it kept characters worse, see the README)
    reencode_images: bool = False
    # each regressed frame is put back among the features the tokenizer's final LayerNorm can output
    # (every token re-standardised through its affine, FrozenVisionEncoder.project) before it is
    # drawn and read back: MSE shrinks what it is unsure of, and a story that reads its shrunken
    # regressions back fades a little at every step (needs post_layernorm; see the README)
    project_features: bool = False
    draw_images: bool = True  # False: text and features only (benchmarks of the LLM part)
    # one GPU: only the working network (MLLM or de-tokenizer) is on the device, the other in CPU
    # memory; the story is written first, then drawn (the same story, see components/placement.py)
    offload: bool = False
    compile_unet: bool = False  # torch.compile the UNet's forward (in place) before the first image: faster on a GPU
    seed: int = 0  # captions and noise; `predict` derives each story's own from it and the story's id


@dataclass
class StoryStep:
    caption: str
    features: torch.Tensor  # (N, D) regressed (or given, for start frames)
    image: torch.Tensor | None  # (3, H, W) in [-1, 1]; start frames keep their input image
    given: bool  # a start frame, not generated
    llm_seconds: float = 0.0
    image_seconds: float = 0.0
    kv_bytes: int = 0
    cached_tokens: int = 0
    read_features: torch.Tensor | None = None  # what later steps read for this frame (None: ``features``)

    @property
    def context_features(self) -> torch.Tensor:
        return self.features if self.read_features is None else self.read_features


@dataclass
class Story:
    steps: list[StoryStep]
    settings: GenerationSettings

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.steps]

    def summary(self) -> dict:
        return {
            "captions": self.captions,
            "given": [s.given for s in self.steps],
            "settings": asdict(self.settings),
            "timings": [{"llm_seconds": s.llm_seconds, "image_seconds": s.image_seconds, "kv_bytes": s.kv_bytes,
                         "cached_tokens": s.cached_tokens} for s in self.steps],
        }


class _LLMContext:
    """A KV cache plus what each cached token is; positions are cache indices (kept contiguous)."""

    def __init__(self, mllm):
        self.mllm = mllm
        self.base = mllm.base_llm
        self.cache = DynamicCache()
        self.log = sink.TokenLog()

    def __len__(self) -> int:
        return len(self.log)

    def feed(self, embeds: torch.Tensor, role: int, frame: int = -1) -> torch.Tensor:
        """Append ``(T, H)`` embeddings; return their last-layer hidden states ``(T, H)``."""
        start = len(self.log)
        positions = torch.arange(start, start + embeds.shape[0], device=embeds.device)[None]
        out = self.base.model(inputs_embeds=embeds[None], position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.log.add(role, frame, embeds.shape[0])
        return out.last_hidden_state[0]

    def feed_ids(self, ids: list[int], role: int = sink.TEXT, frame: int = -1) -> torch.Tensor:
        """Append token ids; return their last-layer hidden states ``(T, H)``."""
        embeds = self.base.get_input_embeddings()(torch.tensor(ids, device=self.mllm.device))
        return self.feed(embeds, role, frame)

    def crop(self, length: int) -> None:
        if length < len(self.log):
            self.cache.crop(length - len(self.log))  # a negative count removes that many tokens
        self.log.crop(length)

    def evict_to(self, index: list[int]) -> None:
        if len(index) == len(self.log):
            return
        sink.evict(self.cache, index, self.base.model.rotary_emb)
        self.log.keep(index)


class StoryGenerator:
    """Generates stories with a frozen stage-2 MLLM and a de-tokenizer (see the module docstring).

    Every token comes from the MLLM's :class:`~datamodules.story_format.StoryFormat`, the object that
    also lays out training batches, so a story is fed exactly as training saw it. ``detokenizer``
    may be None when ``settings.draw_images`` is False (text and features only).
    """

    def __init__(self, mllm, detokenizer=None, settings: GenerationSettings | None = None,
                 device: torch.device | str | None = None):
        self.mllm = mllm
        self.format = mllm.story_format
        self.detokenizer = detokenizer
        self.settings = settings or GenerationSettings()
        # the execution device (default: where the MLLM is); with offload, each part goes there to work
        self.placement = Placement({"mllm": mllm, "detokenizer": detokenizer}, device or mllm.device, self.settings.offload)
        if self.settings.project_features:
            mllm.vision_encoder.check_projectable()
        scaling = getattr(mllm.base_llm.model.rotary_emb, "attention_scaling", 1.0)
        if self.settings.context.mode == "sink" and scaling != 1.0:
            raise ValueError("the attention sink re-rotates keys and supports only plain RoPE (attention_scaling 1)")

    # -- public API -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        start_vit_pixels: torch.Tensor,
        start_captions: list[str],
        captions: list[str] | None = None,
        start_images: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> Story:
        """Continue a story from ``k`` start frames (``(k, 3, S, S)`` ViT views) and their captions.

        ``captions`` switches to visualization mode: those captions are given, only images are drawn.
        """
        if len(start_vit_pixels) != len(start_captions) or len(start_captions) == 0:
            raise ValueError("give one caption per start frame, and at least one start frame")
        if self.settings.draw_images and self.detokenizer is None:
            raise ValueError("drawing images needs a de-tokenizer (or settings.draw_images=False)")
        n_steps = len(captions) if captions is not None else (steps or self.settings.steps)
        mllm = self.mllm
        self.placement.use("mllm")
        mllm.ensure_built()
        sharding.begin(mllm)
        features = mllm.vision_encoder(start_vit_pixels.to(mllm.device)).float()
        story = [StoryStep(c, f, start_images[i] if start_images is not None else None, True)
                 for i, (c, f) in enumerate(zip(start_captions, features))]
        generator = torch.Generator().manual_seed(self.settings.seed)
        policy = self.settings.context
        previous = story[-1].features  # the last frame as the model sees it
        context = None
        # offload: the story does not read its images back, so it is written whole, then drawn
        draw_later = self.settings.offload and self.settings.draw_images and not self.settings.reencode_images
        if policy.mode != "window":
            context = _LLMContext(mllm)
            for i, step in enumerate(story):
                self._feed_frame(context, step.caption, step.features, i)
        for t in range(n_steps):
            frame = len(story)
            t0 = time.perf_counter()
            if policy.mode == "window":
                context = _LLMContext(mllm)
                recent = story[-policy.window_frames :]
                for i, step in enumerate(recent):
                    self._feed_frame(context, step.caption, step.context_features, frame - len(recent) + i)
            given = captions[t] if captions is not None else None
            edited = story[0].features if mllm.edit_from == "start" else previous  # what the regression edits
            caption, features, _ = self.write_step(context, frame, given, generator, edited)
            llm_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            image = None
            if self.settings.draw_images and not draw_later:
                self.placement.use("detokenizer")
                image = self.draw(features, frame)
                self.placement.use("mllm")
            image_seconds = time.perf_counter() - t1
            t2 = time.perf_counter()
            previous = self._reencode(image) if self.settings.reencode_images and image is not None else features
            self.close_image(context, previous, frame)
            if policy.mode == "sink":
                context.evict_to(sink.sink_keep_indices(context.log, policy.sink))
            llm_seconds += time.perf_counter() - t2
            story.append(StoryStep(caption, features, image, False, llm_seconds, image_seconds,
                                   sink.cache_bytes(context.cache), len(context), previous))
        if draw_later:
            del context  # the KV cache is not needed to draw
            self.placement.use("detokenizer")
            for frame, step in enumerate(story):
                if not step.given:
                    t1 = time.perf_counter()
                    step.image = self.draw(step.features, frame)
                    step.image_seconds = time.perf_counter() - t1
        return Story(story, self.settings)

    def draw(self, features: torch.Tensor, frame: int) -> torch.Tensor:
        """The de-tokenizer's image of a frame's features, under the frame's own noise seed."""
        unet = self.detokenizer.unet
        if self.settings.compile_unet and getattr(unet, "_compiled_call_impl", None) is None:
            unet.compile()  # once per UNet: later generators find it compiled (same weights, same state dict)
        noise = torch.Generator().manual_seed(self.settings.seed * 100003 + frame)
        return self.detokenizer.decode(features[None].to(self.detokenizer.device), generator=noise,
                                       num_inference_steps=self.settings.num_inference_steps,
                                       guidance_scale=self.settings.guidance_scale, sampler=self.settings.sampler)[0]

    def branch(self, start_vit_pixels: torch.Tensor, opening_texts: list[str], **kwargs) -> list[Story]:
        """One start image, several opening texts: one story each."""
        return [self.generate(start_vit_pixels[:1], [text], **kwargs) for text in opening_texts]

    @torch.no_grad()
    def next_caption(self, context_features: torch.Tensor, captions: list[str],
                     generator: torch.Generator | None = None) -> str:
        """The caption the MLLM writes after ``captions`` (one per context frame, features ``(n, N, D)``)."""
        self.placement.use("mllm")
        self.mllm.ensure_built()
        sharding.begin(self.mllm)
        context = _LLMContext(self.mllm)
        for i, (caption, features) in enumerate(zip(captions, context_features, strict=True)):
            self._feed_frame(context, caption, features, i)
        hidden = context.feed_ids(self.format.tokens.step_opening(first=len(context) == 0))
        return self.format.decode_text(self.decode_caption(context, hidden, generator))

    # -- one step (the story format, one step at a time) ---------------------------------------

    def new_context(self) -> _LLMContext:
        return _LLMContext(self.mllm)

    def _feed_frame(self, context: _LLMContext, caption: str, features: torch.Tensor, frame: int) -> None:
        """A complete context step: opening (BOS or separator), caption, ``<img>``, Q context slots, ``</img>``."""
        tokens, first = self.format.tokens, len(context) == 0
        context.feed_ids(tokens.step_opening(first) + self.format.step_caption_ids(caption, first) + [tokens.img_start])
        context.log.roles[-1], context.log.frames[-1] = sink.IMG_START, frame
        self.close_image(context, features, frame)

    def close_image(self, context: _LLMContext, features: torch.Tensor, frame: int) -> None:
        """The frame's Q context slots (its features through the input resampler), then ``</img>``."""
        slots = self.mllm.input_resampler(features[None].to(self.mllm.device, self.mllm.dtype))[0]
        embeds_dtype = self.mllm.base_llm.get_input_embeddings().weight.dtype
        context.feed(slots.to(embeds_dtype), sink.SLOT, frame)
        context.feed_ids([self.format.tokens.img_end], sink.IMG_END, frame)

    def write_step(self, context: _LLMContext, frame: int, given: str | None, generator: torch.Generator | None,
                   edited: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Separator, caption (decoded, or ``given``), ``<img>``, then the regressed features of the new frame
        (an edit of ``edited``'s features where the MLLM regresses edits: its ``edit_from``).

        Returns the caption, the features and the hidden states of the step's text tokens
        (separator, caption, ``<img>``): what predicts each next token, as in training's labels.
        """
        tokens = self.format.tokens
        hidden = [context.feed_ids(tokens.step_opening(first=False))]
        if given is not None:
            ids = self.format.step_caption_ids(given, first=False)
            if ids:
                hidden.append(context.feed_ids(ids))
        else:
            ids = self.decode_caption(context, hidden[-1], generator, hidden)
        hidden.append(context.feed_ids([tokens.img_start], sink.IMG_START, frame))
        length = len(context)
        queries = context.feed_ids(list(tokens.slots), sink.SLOT, frame)
        dtype = self.mllm.dtype  # the weights' (fp32 under autocast, bf16 when the model is bf16); features kept in fp32
        step_text = torch.cat(hidden)  # what regress_from: step reads besides the slots
        features = self.mllm.regress(queries[None].to(dtype), edited[None].to(queries.device, dtype),
                                     step_text[None].to(dtype))[0].float()
        if self.settings.project_features:
            features = self.mllm.vision_encoder.project(features)
        context.crop(length)  # the generation queries give way to the frame's context slots
        caption = given if given is not None else self.format.decode_text(ids)
        return caption, features, step_text

    def decode_caption(self, context: _LLMContext, hidden: torch.Tensor, generator: torch.Generator | None,
                       hidden_log: list[torch.Tensor] | None = None) -> list[int]:
        """The one decoding loop: tokens until ``<img>``, EOS or ``max_new_tokens``, each fed to the cache."""
        tokens, settings = self.format.tokens, self.settings.decode
        head = self.mllm.base_llm.lm_head
        stop = (tokens.img_start, tokens.eos)
        never = (*tokens.slots, tokens.img_end)  # image tokens are never text (as the released agent masks them)
        ids: list[int] = []
        for _ in range(settings.max_new_tokens):
            banned = (*never, *stop) if len(ids) < settings.min_new_tokens else never
            token = pick_token(head(hidden[-1]), settings, generator, banned)
            if token in stop:
                break
            ids.append(token)
            hidden = context.feed_ids([token])
            if hidden_log is not None:
                hidden_log.append(hidden)
        return ids

    def _reencode(self, image: torch.Tensor) -> torch.Tensor:
        """ViT features of a drawn image (``[-1, 1]``), through the data pipeline's ViT view."""
        pixels = self.format.vit_pixels_of(image[None]).to(self.mllm.device)
        return self.mllm.vision_encoder(pixels)[0].float()
