"""The released SEED-Story / SEED-X agent (``ContinuousLVLM``'s ``pytorch_model.bin``) in the stage-2 MLLM.

What the file holds (``docs`` of the project: the reference release): ``llm.base_model.model.*``,
a Llama under peft-0.4 LoRA (``q_proj.lora_A.default.weight`` ... on every projection, the frozen
projection itself as ``q_proj.weight`` when the file carries it), the norms trained whole as
``{original_module, modules_to_save.default}``, the embeddings and the LM head trained in place
(``embed_tokens.weight``, ``lm_head.weight``, 32066 rows), ``rotary_emb.inv_freq`` buffers, and the
two resamplers (``input_resampler.*``, ``output_resampler.*``).

This module places each tensor in the project's peft model (current peft names: the frozen
projection is ``base_layer``; the embeddings and head are ``modules_to_save`` here, which computes
the same thing) and takes the rows of the vocabulary matrices **by token string** from the
released tokenizer, so a tokenizer whose 66 story tokens have other ids still gets the right rows.
Every tensor must find its place with its shape; a frozen tensor the file carries must equal the
base model's (else the file was trained from another base); the rotary frequencies must equal the
model's. Anything else fails with the names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from datamodules.exports import prefixed
from datamodules.tokenizer import IMG_END, IMG_START, image_slot_tokens
from lightning_modules.components.strict_load import load_strictly

LLM_PREFIX = "llm"
RESAMPLERS = ("input_resampler", "output_resampler")
VOCABULARY_MATRICES = ("embed_tokens", "lm_head")
TRAINED_MARKS = (".lora_A.", ".lora_B.", ".modules_to_save.")  # what the release must provide


def vocabulary_rows(ours, released, source: str, num_queries: int) -> torch.Tensor:
    """``rows[i]``: the released id of our token ``i``, matched by string (the story tokens included)."""
    released_vocab, our_vocab = released.get_vocab(), ours.get_vocab()
    story = [IMG_START, IMG_END, *image_slot_tokens(num_queries)]
    lacking = [t for t in story if t not in released_vocab]
    if lacking:
        raise ValueError(f"{source} lacks {len(lacking)} of the story tokens ({', '.join(lacking[:3])}, ...): "
                         "it is not the agent's tokenizer; pass the released cvlm_llama2_tokenizer folder")
    absent = sorted(t for t in our_vocab if t not in released_vocab)
    if absent:
        raise ValueError(f"{source} has no token for {len(absent)} of the model's tokens ({', '.join(absent[:6])}): "
                         "story_format.tokenizer and the released tokenizer must share the base vocabulary")
    rows = torch.full((len(ours),), -1, dtype=torch.long)
    for token, index in our_vocab.items():
        rows[index] = released_vocab[token]
    if (rows < 0).any():
        raise ValueError(f"the model's tokenizer has unnumbered ids: {(rows < 0).nonzero().flatten()[:6].tolist()}")
    return rows


def _our_names(key: str, ours: Mapping[str, torch.Tensor]) -> list[str]:
    """Where a released LLM tensor goes: its own name, the peft ``base_layer``, or ``modules_to_save``."""
    stem = key.removesuffix(".weight")
    for name in (key, f"{stem}.base_layer.weight", f"{stem}.modules_to_save.default.weight"):
        if name in ours:
            return [name]
    return []


def _is_vocabulary(name: str) -> bool:
    return any(f".{matrix}." in f".{name}" for matrix in VOCABULARY_MATRICES)


def llm_state_from_release(release_llm: Mapping[str, torch.Tensor], llm: nn.Module, rows: torch.Tensor,
                           source: str) -> dict[str, torch.Tensor]:
    """The peft model's whole state dict with the released tensors in place (the base model's elsewhere)."""
    ours = llm.state_dict()
    state = dict(ours)
    # the model's rotary frequencies (one buffer, shared by every layer), which the file's copies must equal
    rotary = next((buffer for name, buffer in llm.named_buffers() if name.endswith("rotary_emb.inv_freq")), None)
    placed: set[str] = set()
    unexpected, wrong, other_base, other_rotary = [], [], [], []
    for key, value in release_llm.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer the model computes; it must agree
            if rotary is None or rotary.shape != value.shape or not torch.allclose(rotary.float(), value.float(), rtol=1e-6):
                other_rotary.append(key)
            continue
        names = _our_names(key, ours)
        if not names:
            unexpected.append(key)
            continue
        name = names[0]
        if _is_vocabulary(name):
            if value.shape[0] <= int(rows.max()):
                wrong.append(f"{key}: {value.shape[0]} rows, the released tokenizer has id {int(rows.max())}")
                continue
            value = value[rows]
        if tuple(value.shape) != tuple(ours[name].shape):
            wrong.append(f"{key}: {tuple(value.shape)} given, {tuple(ours[name].shape)} expected at {name}")
            continue
        frozen = not any(mark in name for mark in TRAINED_MARKS) and not _is_vocabulary(name)
        if frozen and not torch.equal(ours[name].to(value.dtype), value):
            other_base.append(key)
            continue
        state[name] = value.to(ours[name].dtype)
        placed.add(name)
    missing = sorted(n for n in ours if any(mark in n for mark in TRAINED_MARKS) and n not in placed
                     and not n.endswith(".original_module.weight"))
    problems = []
    for label, names in (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", wrong),
                         ("different from the base model at llm.path (the agent was trained from another base)", other_base),
                         ("rotary frequencies unlike the model's (rope_theta or head size differ)", other_rotary)):
        if names:
            lines = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            problems.append(f"{label} ({len(names)}): {lines}")
    if problems:
        raise ValueError(f"{source} does not fit the stage-2 LLM: " + "; ".join(problems))
    return state


def load_released_agent(module: nn.Module, release: Mapping[str, torch.Tensor], rows: torch.Tensor, source: str) -> None:
    """Put a released agent state dict into a built :class:`~lightning_modules.story_mllm.StoryMLLMModule`."""
    others = sorted(k for k in release if k.split(".", 1)[0] not in (LLM_PREFIX, *RESAMPLERS))
    if others:
        raise ValueError(f"{source}: unexpected tensors outside llm.*, input_resampler.*, output_resampler.*: {others[:6]}")
    if not hasattr(module.llm, "peft_config"):
        raise ValueError("the released agent is a LoRA model: the stage-2 config needs its `lora:` settings (r 16, alpha 32)")
    load_strictly(module.llm, llm_state_from_release(prefixed(release, LLM_PREFIX), module.llm, rows, source), f"{source} (llm.*)")
    for name in RESAMPLERS:
        load_strictly(getattr(module, name), prefixed(release, name), f"{source} ({name}.*)")
