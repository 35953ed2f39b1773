"""Held-out evaluation of a stage-2 export against simple baselines.

    python -m tools.evaluate_mllm --export runs/tiny_stage2/export \
        --data data/synthetic --split val [--length 10] [--out metrics.json]

For every story of the split (its first ``length`` frames) and every step ``k >= 1``, with the
true frames and captions ``0..k-1`` as context:

- next-caption perplexity (teacher forced, caption tokens and ``<img>``) vs an interpolated
  bigram model trained on the train split's captions with the same tokenizer;
- cast fidelity: the greedy next caption names only characters of the story's own cast;
- feature cosine: regressed features vs the true frame ``k``, against copying frame ``k-1``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from datamodules import records
from datamodules.images import FileStore, decode_rgb
from datamodules.sequence import IGNORE_INDEX
from datamodules.synthetic_world import CHARACTER_NAMES
from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings, StoryGenerator
from lightning_modules.mllm_export import load_mllm
from lightning_modules.story_mllm import StoryMLLMModule


class BigramModel:
    """P(t | prev) = lam * ML bigram + (1 - lam) * add-one unigram, over caption token streams."""

    def __init__(self, streams: list[list[int]], vocab_size: int, lam: float = 0.9):
        self.bigram = torch.zeros(vocab_size, vocab_size)
        unigram = torch.ones(vocab_size)
        for stream in streams:
            for prev, token in zip(stream[:-1], stream[1:]):
                self.bigram[prev, token] += 1
                unigram[token] += 1
        self.unigram = unigram / unigram.sum()
        self.lam = lam

    def nll(self, stream: list[int], scored_from: int = 1) -> tuple[float, int]:
        """Summed negative log-likelihood of ``stream[scored_from:]`` and the token count."""
        total = 0.0
        for prev, token in zip(stream[scored_from - 1 : -1], stream[scored_from:]):
            row = self.bigram[prev]
            ml = row[token] / row.sum() if row.sum() > 0 else 0.0
            total -= math.log(self.lam * float(ml) + (1 - self.lam) * float(self.unigram[token]))
        return total, len(stream) - scored_from


def caption_stream(module: StoryMLLMModule, caption: str) -> list[int]:
    """``[INST] caption <img>``: the tokens a step's text is scored on (after the separator)."""
    tokens = module.story_format.tokens
    return [*tokens.separator, *module.story_format.step_caption_ids(caption, first=False), tokens.img_start]


def named_characters(caption: str) -> set[str]:
    words = set(caption.replace(".", " ").replace(",", " ").split())
    return {name for name in CHARACTER_NAMES if name in words}


@torch.no_grad()
def evaluate(module: StoryMLLMModule, stories: list[records.StoryRecord], store: FileStore, train_captions: list[str],
             length: int = 10) -> dict[str, float]:
    module.story_format = fmt = module.story_format.replace(supervise="last")
    writer = StoryGenerator(module, None, GenerationSettings(draw_images=False, context=ContextPolicy(mode="dense")))
    bigram = BigramModel([caption_stream(module, c) for c in train_captions], len(fmt.tokenizer))
    sep = len(fmt.tokens.separator)
    totals = dict(model_nll=0.0, bigram_nll=0.0, tokens=0, steps=0, cast_ok=0, cos=0.0, copy_cos=0.0)
    for story in stories:
        n = min(length, len(story))
        pixels = torch.stack([fmt.vit_view(decode_rgb(store.read(ref), ref)) for ref in story.images[:n]])
        features = module.vision_encoder(pixels.to(module.device))
        steps = list(range(1, n))
        batch = {"captions": [story.captions[: k + 1] for k in steps]}
        index = torch.arange(n, device=module.device).expand(len(steps), n)
        out = module.forward_story(batch, features, index)
        logprobs = torch.log_softmax(out.logits[:, :-1].float(), -1)
        labels = out.sequence.labels[:, 1:]
        cast = set(story.extra.get("cast") or {c for frame in (story.characters or []) for c in frame})
        for row, k in enumerate(steps):
            scored = (labels[row] != IGNORE_INDEX).nonzero().flatten()[sep:-1]  # caption + <img>, not [INST] / EOS
            totals["model_nll"] -= float(logprobs[row, scored, labels[row, scored]].sum())
            nll, count = bigram.nll(caption_stream(module, story.captions[k]), scored_from=sep)
            assert count == len(scored), "bigram and model must score the same tokens"
            totals["bigram_nll"] += nll
            totals["tokens"] += count
            caption = writer.next_caption(features[:k], story.captions[:k])
            totals["cast_ok"] += int(named_characters(caption) <= cast)
        cos = torch.nn.functional.cosine_similarity(out.predicted_features, out.target_features, dim=-1).mean(-1)
        copy = torch.nn.functional.cosine_similarity(out.previous_features, out.target_features, dim=-1).mean(-1)
        totals["cos"] += float(cos.sum())
        totals["copy_cos"] += float(copy.sum())
        totals["steps"] += len(steps)
    return {
        "stories": len(stories),
        "steps": totals["steps"],
        "next_caption_ppl": math.exp(totals["model_nll"] / totals["tokens"]),
        "bigram_ppl": math.exp(totals["bigram_nll"] / totals["tokens"]),
        "cast_fidelity": totals["cast_ok"] / totals["steps"],
        "feature_cos": totals["cos"] / totals["steps"],
        "copy_previous_cos": totals["copy_cos"] / totals["steps"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, type=Path, help="stage-2 export folder (save_mllm)")
    parser.add_argument("--data", required=True, type=Path, help="folder with train/val/test jsonl and images/")
    parser.add_argument("--split", default="val")
    parser.add_argument("--length", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    module = load_mllm(args.export)
    skips = records.SkipCounter()
    stories = records.read_jsonl(args.data / f"{args.split}.jsonl", 2, skips)
    train_captions = [c for s in records.read_jsonl(args.data / "train.jsonl", 2, skips) for c in s.captions]
    result = evaluate(module, stories, FileStore(str(args.data / "images")), train_captions, args.length)
    print("| metric | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
