"""Real-scale cost from the real configs: training throughput of each stage and the cost of a story.

    python bench/real_scale.py                          # on a GPU: full-size networks, random init (no weights)
    python bench/real_scale.py --scale mini --device cpu --story-steps 2 --table-steps 2   # what the test runs

``configs/seed_story/`` builds every network. ``full`` replaces each pretrained path by random init
of the same architecture (SD-XL UNet and VAE from their config files, Qwen-VL ViT-G, Llama-2-7b from
its config; a stand-in SentencePiece tokenizer, so the LLM's vocabulary is ~400 rows, not 32,000:
the parameter count printed is what ran); ``mini`` runs them on ``tools.mini_pretrained``'s folders.
The batches come from the data pipeline over a small synthetic world at the config's image size.
Printed, per GPU (one process):

- stage 2: tokens/s of a training step (forward, backward, AdamW; bf16 autocast) at the config's
  batch and length, and MFU (``4 N + 2 N_trainable`` FLOPs a token over the GPU's bf16 peak);
- stages 1 and 3: images/s of a training step at the config's image size, and peak memory
  (stage 3: the frozen MLLM regresses the features, the de-tokenizer trains on them);
- a story (bf16 weights on a GPU): per step the milliseconds of LLM, UNet and VAE (and the ViT
  per start frame) for dense / window / sink with Euler 50 and DPM-Solver++ 20; then one
  ``--story-steps`` story the one-GPU way (sink, DPM-Solver++ 20, offload), its total seconds and
  peak memory (the goal: a 50-step 1024² story in <= 100 s at <= 24 GB).

Timings synchronise the device around each UNet, VAE and ViT call. Nothing here is a test
threshold: ``tests/test_bench_real_scale.py`` only checks that the miniature run prints its table.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from datamodules import synthetic
from lightning_modules.components.caption_decoding import DecodeSettings
from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings, StoryGenerator
from tools.cli import cli_main, composed_yaml, config_command

STAGE1, STAGE2 = "configs/seed_story/stage1_detokenizer.yaml", "configs/seed_story/stage2_mllm.yaml"
GENERATE = "configs/seed_story/generate.yaml"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


# -- building -------------------------------------------------------------------------------------

def full_random_args(tmp: Path) -> dict[str, list[str]]:
    """Overrides that build every real network at full size with random weights (no files read but configs)."""
    from lightning_modules.components.codecs import sdxl_vae_architecture
    from tools.mini_pretrained import write_llama_tokenizer

    sdxl_vae_architecture().save_pretrained(tmp / "sdxl" / "vae")
    tokenizer = write_llama_tokenizer(tmp / "tokenizer")
    return {"stage1": ["--model.init_args.unet.path=null", f"--model.init_args.vae_path={tmp / 'sdxl'}",
                       "--model.init_args.vision_encoder.path=null"],
            "stage2": ["--model.init_args.llm.path=null", f"--model.init_args.story_format.tokenizer={tokenizer}",
                       "--model.init_args.vision_encoder.path=null"]}


def build(scale: str, device: torch.device, tmp: Path) -> tuple:
    """(stage-1 module, stage-2 module, stage-1 datamodule, stage-2 datamodule, image size) from the real configs."""
    if scale == "mini":
        from tools.mini_pretrained import mini_overrides, write_mini_pretrained

        write_mini_pretrained(tmp / "pretrained")
        args, size = mini_overrides(tmp / "pretrained"), 32  # the mini SD-XL's native resolution
    else:
        args, size = full_random_args(tmp), composed_yaml(STAGE1)["data"]["init_args"]["image_size"]
        size = size if isinstance(size, int) else size[0]
    files = synthetic.generate(tmp / "world", 12, 0, (size, size))
    data = [f"--data.init_args.train_files={files['train']}", f"--data.init_args.val_files={files['val']}",
            f"--data.init_args.test_files={files['test']}", f"--data.init_args.image_root={files['train'].parent / 'images'}",
            f"--data.init_args.image_size=[{size}, {size}]", "--data.init_args.num_workers=0"]
    trainer = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false"]
    built = []
    for config, extra in ((STAGE1, args["stage1"]), (STAGE2, [*args["stage2"], "--data.init_args.max_images=10"])):
        cli = cli_main([*config_command(config)[1:], *trainer, *data, *extra], run=False)
        with torch.device(device):  # random init straight on the device
            cli.model.configure_model()
        built.append((cli.model.to(device), cli.datamodule))
    (detok, dm1), (mllm, dm2) = built
    return detok, mllm, dm1, dm2, size


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def first_batch(datamodule, device: torch.device) -> dict:
    datamodule.setup("fit")
    return to_device(next(iter(datamodule.train_dataloader())), device)


# -- measuring ------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> str:
    """Peak device memory since the last reset (CUDA), or the process's peak RSS (CPU; never reset)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} (RSS)"


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def seconds_per_step(step, device: torch.device, iters: int) -> float:
    step()  # warm-up: allocator, kernels, lazy towers
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - start) / iters


def train_step(module, loss_fn, device: torch.device):
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-6)

    def step() -> None:
        with autocast(device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def training_rows(detok, mllm, dm1, dm2, device: torch.device, iters: int, tflops: float | None) -> list[str]:
    rows = []
    detok.train()
    batch1 = first_batch(dm1, device)
    reset_peak(device)
    s = seconds_per_step(train_step(detok, lambda: detok._shared_step(batch1, "train"), device), device, iters)
    rows.append(f"| stage 1 | {len(batch1['pixels'])} images | {len(batch1['pixels']) / s:.2f} images/s | - | {peak_gb(device)} |")

    mllm.train()
    batch2 = first_batch(dm2, device)
    tokens = int(batch2["sequence"].attention_mask.sum())
    reset_peak(device)
    s = seconds_per_step(train_step(mllm, lambda: mllm._shared_step(batch2, "train"), device), device, iters)
    n_all = sum(p.numel() for p in mllm.llm.parameters())
    n_trained = sum(p.numel() for p in mllm.trainable_parameters())
    mfu = f"{tokens / s * (4 * n_all + 2 * n_trained) / (tflops * 1e12):.1%}" if tflops else "n/a"
    rows.append(f"| stage 2 | {tokens} tokens ({len(batch2['story_id'])} stories) | {tokens / s:.0f} tokens/s | {mfu} | "
                f"{peak_gb(device)} |")

    # stage 3: the frozen MLLM regresses every frame after the first; the de-tokenizer trains on them
    mllm.eval().requires_grad_(False)
    fmt = mllm.story_format
    mllm.story_format = fmt.replace(supervise="all")
    stories = {k: v for k, v in batch2.items() if k != "sequence"}  # laid out again with supervise=all

    seen = {}

    def stage3_loss() -> torch.Tensor:
        with torch.no_grad():
            out = mllm.forward_story(stories)
        rows_, cols = out.sequence.target_frames.to(device).unbind(1)
        seen["frames"] = len(rows_)
        return detok.denoising_loss(out.predicted_features.detach(), stories["pixels"][rows_, cols],
                                    stories["original_size"][rows_, cols], stories["crop_top_left"][rows_, cols],
                                    stories["target_size"][rows_, cols], train=True)

    reset_peak(device)
    s = seconds_per_step(train_step(detok, stage3_loss, device), device, iters)
    frames = seen["frames"]
    rows.append(f"| stage 3 | {frames} regressed frames | {frames / s:.2f} images/s | - | {peak_gb(device)} |")
    mllm.story_format = fmt
    return rows


class ComponentClock:
    """Seconds spent in the UNet, the VAE decode and the ViT, each call synchronised (forward hooks)."""

    def __init__(self, detok, mllm, device: torch.device):
        self.device, self.seconds, self._start = device, {"unet": 0.0, "vae": 0.0, "vit": 0.0}, {}
        self.handles = [self._hook(detok.unet, "unet"), self._hook(detok.codec, "vae", "decode"),
                        self._hook(mllm.vision_encoder, "vit")]

    def _hook(self, module, name: str, method: str = "forward"):
        original = getattr(module, method)

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self.seconds[name] += time.perf_counter() - start
            return out

        setattr(module, method, timed)
        return module, method, original

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def close(self) -> None:
        for module, method, original in self.handles:
            setattr(module, method, original)


def story_rows(detok, mllm, dm2, device: torch.device, table_steps: int, story_steps: int) -> tuple[list[str], str]:
    detok.eval().requires_grad_(False)
    mllm.eval().requires_grad_(False)
    if device.type == "cuda":  # generation the one-GPU way: bf16 weights (precision bf16-true)
        detok.to(torch.bfloat16)
        mllm.to(torch.bfloat16)
    batch = first_batch(dm2, device)
    start, caption = batch["vit_pixels"][0, :1].to(mllm.dtype), batch["captions"][0][:1]
    generate = composed_yaml(GENERATE)["model"]["init_args"]["generation"]
    context = generate.get("context", {})
    decode = DecodeSettings(max_new_tokens=40, min_new_tokens=40)  # every caption 40 tokens: the same work each step
    clock = ComponentClock(detok, mllm, device)
    rows = []
    try:
        for sampler, n in (("euler", generate.get("num_inference_steps", 50)), ("dpmpp", 20)):
            for mode in ("dense", "window", "sink"):
                policy = ContextPolicy(mode=mode, window_frames=context.get("window_frames", 8))
                if mode == "sink" and "sink" in context:
                    from lightning_modules.components.attention_sink import SinkSettings

                    policy.sink = SinkSettings(**context["sink"])
                settings = GenerationSettings(steps=table_steps, decode=decode, num_inference_steps=n, sampler=sampler,
                                              guidance_scale=generate.get("guidance_scale", 7.5), context=policy)
                clock.reset()
                story = StoryGenerator(mllm, detok, settings, device).generate(start, caption)
                steps = story.steps[1:]
                image = statistics.mean(s.image_seconds for s in steps)
                llm = statistics.mean(s.llm_seconds for s in steps)
                unet, vae = (clock.seconds[k] / len(steps) for k in ("unet", "vae"))
                rows.append(f"| {sampler}-{n} | {mode} | {llm * 1e3:.0f} | {unet * 1e3:.0f} | {vae * 1e3:.0f} | "
                            f"{clock.seconds['vit'] * 1e3:.0f} | {(llm + image) * 1e3:.0f} |")
        # the one-GPU story: sink, DPM-Solver++ 20, the networks taking turns on the device
        settings = GenerationSettings(steps=story_steps, decode=decode, num_inference_steps=20, sampler="dpmpp",
                                      guidance_scale=generate.get("guidance_scale", 7.5), offload=True,
                                      context=ContextPolicy(mode="sink"))
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        StoryGenerator(mllm, detok, settings, device).generate(start, caption)
        sync(device)
        total = (f"a {story_steps}-step story, sink, dpmpp-20, offload: {time.perf_counter() - t0:.1f} s, "
                 f"peak memory {peak_gb(device)} GB")
    finally:
        clock.close()
    return rows, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["full", "mini"], default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=3, help="timed training steps per stage (after one warm-up)")
    parser.add_argument("--table-steps", type=int, default=5, help="story steps per row of the per-step table")
    parser.add_argument("--story-steps", type=int, default=50)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's bf16 dense peak for MFU (default: known GPUs)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        detok, mllm, dm1, dm2, size = build(args.scale, device, Path(tmp))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        train = training_rows(detok, mllm, dm1, dm2, device, args.iters, peak_tflops(device, args.peak_tflops))
        steps, total = story_rows(detok, mllm, dm2, device, args.table_steps, args.story_steps)
    n_llm = sum(p.numel() for p in mllm.llm.parameters()) / 1e9
    n_unet = sum(p.numel() for p in detok.unet.parameters()) / 1e9
    print(f"\n{args.scale} scale on {name}: LLM {n_llm:.3f} B, UNet {n_unet:.3f} B, images {size}px, bf16 autocast on GPU\n")
    print("| stage | per step | throughput | MFU | peak GB |\n|---|---|---|---|---|")
    print("\n".join(train))
    print("\nper story step (ms); ViT: the start frame, once per story\n")
    print("| sampler | context | LLM | UNet | VAE | ViT | step |\n|---|---|---|---|---|---|---|")
    print("\n".join(steps))
    print(f"\n{total}")


if __name__ == "__main__":
    main()
