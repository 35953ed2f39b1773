"""Story generation cost per context policy: dense vs window (re-encode) vs attention sink.

    python bench/generation.py [--mllm-dir runs/tiny_stage2/export] [--detokenizer-dir runs/tiny_stage3/export]
                               [--steps 50] [--draw]

Generates one 50-step story per policy from the same start frame and prints, at steps 5, 10,
25 and 50, the LLM time per step (caption decoding, image queries, context update; averaged
over the three steps ending there), the KV-cache bytes and cached tokens. Every caption is
exactly 24 tokens (``min_new_tokens``), so each step does the same work and only the context
policy differs. Image drawing is
timed separately (``--draw``), since it does not depend on the policy. Without exports, a
random tiny MLLM with the tiny config's shape is built (timing does not need trained weights).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from datamodules import synthetic
from datamodules.story_format import StoryFormatConfig
from datamodules.storystream import StoryStreamDataModule
from lightning_modules.components.attention_sink import SinkSettings
from lightning_modules.components.caption_decoding import DecodeSettings
from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings, StoryGenerator
from lightning_modules.components.story_llm import LLMSpec
from lightning_modules.components.vision_encoder import VisionEncoderConfig
from lightning_modules.language_model import export_untrained
from lightning_modules.mllm_export import load_mllm
from lightning_modules.story_mllm import StoryMLLMModule

REPORT_STEPS = (5, 10, 25, 50)


def random_mllm(world: Path) -> StoryMLLMModule:
    """The tiny stage-2 config's architecture, random weights."""
    tiny = yaml.safe_load(Path("configs/tiny/stage2_mllm.yaml").read_text())["model"]["init_args"]
    language_model = yaml.safe_load(Path("configs/tiny/language_model.yaml").read_text())["model"]["init_args"]
    llm = export_untrained(LLMSpec(**language_model["llm"]), [str(world / "train.jsonl")], world / "llm")
    fmt = StoryFormatConfig(**{**tiny["story_format"], "tokenizer": str(llm)})
    module = StoryMLLMModule(llm=LLMSpec(path=str(llm)), story_format=fmt, vision_encoder=VisionEncoderConfig())
    module.configure_model()
    return module.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mllm-dir", type=Path)
    parser.add_argument("--detokenizer-dir", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--draw", action="store_true", help="also draw images (needs --detokenizer-dir)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        synthetic.generate(world, 20, seed=0, size=(64, 64))
        mllm = load_mllm(args.mllm_dir) if args.mllm_dir else random_mllm(world)
        detok = None
        if args.draw:
            from lightning_modules.detokenizer import load_detokenizer

            detok = load_detokenizer(args.detokenizer_dir).eval()
        dm = StoryStreamDataModule(predict_files=str(world / "val.jsonl"), image_root=str(world / "images"), min_images=1,
                                   max_images=1, vit_image_size=mllm.vision_encoder.image_size)
        dm.setup("predict")
        batch = next(iter(dm.predict_dataloader()))
        policies = {
            "dense": ContextPolicy(mode="dense"),
            "window": ContextPolicy(mode="window", window_frames=8),
            "sink": ContextPolicy(mode="sink", sink=SinkSettings()),
        }
        rows = []
        for name, policy in policies.items():
            settings = GenerationSettings(steps=args.steps, context=policy, draw_images=args.draw, num_inference_steps=20,
                                          decode=DecodeSettings(max_new_tokens=24, min_new_tokens=24))
            story = StoryGenerator(mllm, detok, settings).generate(batch["vit_pixels"][0, :1], batch["captions"][0][:1])
            steps = story.steps[1:]
            for k in REPORT_STEPS:
                if k > len(steps):
                    continue
                window = steps[max(0, k - 3) : k]
                rows.append((name, k, statistics.mean(s.llm_seconds for s in window) * 1000,
                             statistics.mean(s.image_seconds for s in window) * 1000, steps[k - 1].kv_bytes / 1024,
                             steps[k - 1].cached_tokens))
    print(f"\nper-step cost of a {args.steps}-step story, {'trained' if args.mllm_dir else 'random'} tiny MLLM, "
          f"{args.threads} thread(s); LLM ms averaged over the 3 steps ending at the step\n")
    print("| policy | step | LLM ms/step | image ms/step | KV KiB | cached tokens |")
    print("|--------|------|-------------|---------------|--------|---------------|")
    for name, k, llm_ms, image_ms, kib, tokens in rows:
        print(f"| {name:<6} | {k:>4} | {llm_ms:>11.1f} | {image_ms:>13.1f} | {kib:>6.0f} | {tokens:>13} |")


if __name__ == "__main__":
    main()
