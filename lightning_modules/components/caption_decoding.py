"""Decoding the next caption of a story from the MLLM (greedy by default, sampling optional).

The prompt holds every given frame as context (its slots filled by the input resampler) and ends
with the step separator; decoding stops at ``<img>``, EOS or ``max_new_tokens``. One prefill
pass, then one token at a time with the LLM's KV cache.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lightning_modules.components.sequence import build_prompt


@dataclass
class DecodeSettings:
    max_new_tokens: int = 40
    min_new_tokens: int = 0  # stop tokens are masked until this many (benchmarks: fixed work per step)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def pick_token(
    logits: torch.Tensor,
    settings: DecodeSettings,
    generator: torch.Generator | None = None,
    banned: Collection[int] = (),
) -> int:
    """Greedy, or temperature + nucleus sampling (reproducible with ``generator``); never a ``banned`` id."""
    if banned:
        logits = logits.clone()
        logits[list(banned)] = float("-inf")
    if settings.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < settings.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def decode_next_caption(
    module,
    context_features: torch.Tensor,
    captions: list[str],
    settings: DecodeSettings | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """Next caption after ``captions`` (one per context frame, features ``(n, N, D)``)."""
    ids = decode_next_caption_ids(module, context_features, captions, settings, generator)
    return module.tokenizer.decode(ids, skip_special_tokens=True).strip()


def prompt_embeddings(module, context_features: torch.Tensor, captions: list[str]):
    """The prompt's token ids, positions and input embeddings (context slots filled)."""
    tokenizer, tokens, base = module.tokenizer, module.tokens, module.base_llm
    caption_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    prompt = build_prompt(caption_ids, tokens)
    embeds = base.get_input_embeddings()(prompt.input_ids.to(module.device))
    if len(prompt.frames):
        slots = module.input_resampler(context_features.to(module.device, torch.float32)).to(embeds.dtype)
        embeds = embeds.index_copy(0, prompt.context_slots.flatten().to(module.device), slots.reshape(-1, embeds.shape[-1]))
    return prompt, embeds


@torch.no_grad()
def decode_next_caption_ids(
    module,
    context_features: torch.Tensor,
    captions: list[str],
    settings: DecodeSettings | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Token ids of the next caption (without the closing ``<img>``)."""
    settings = settings or DecodeSettings()
    module.ensure_built()
    tokens, base, device = module.tokens, module.base_llm, module.device
    prompt, embeds = prompt_embeddings(module, context_features, captions)
    cache = DynamicCache()
    position = int(prompt.position_ids[-1])
    out = base.model(inputs_embeds=embeds[None], position_ids=prompt.position_ids[None].to(device), past_key_values=cache, use_cache=True)
    generated: list[int] = []
    stop = {tokens.img_start, tokens.eos}
    for _ in range(settings.max_new_tokens):
        banned = stop if len(generated) < settings.min_new_tokens else ()
        token = pick_token(base.lm_head(out.last_hidden_state[0, -1]), settings, generator, banned)
        if token in stop:
            break
        generated.append(token)
        position += 1
        out = base.model(input_ids=torch.tensor([[token]], device=device), position_ids=torch.tensor([[position]], device=device),
                         past_key_values=cache, use_cache=True)
    return generated
