"""Will a real-scale stage fit? A per-GPU memory plan under FSDP, computed without any weights.

    python -m tools.plan_memory --config configs/seed_story/stage2_mllm.yaml --gpus 8 --gpu-mem 80
    python -m tools.plan_memory --all --gpus 8 --gpu-mem 24 80

The config's model is built on the ``meta`` device (no weights are read). Per GPU, with every
parameter fully sharded over the GPUs (FSDP / ZeRO-3):

- parameters: trainable ones kept in fp32, frozen ones in the compute dtype (bf16); the frozen ViT
  (every stage) is whole on every GPU, as the modules place it; stage 3's frozen MLLM is sharded;
- gradients: fp32, trainable parameters only; optimizer: two fp32 AdamW moments per trainable;
- working copy: the largest FSDP unit gathered unsharded in bf16 (twice, for prefetching);
- activations: a meta-device forward pass with the config's batch shape, summing what every
  leaf module outputs (an upper bound on what autograd keeps); with activation checkpointing,
  only the inputs of each block plus one block's internals.

Stage 3 is planned from the stage-1 and stage-2 configs (its de-tokenizer is stage 1's, its
frozen MLLM stage 2's, sharded like stage 2's but without gradients), with stage 3's choice of
what trains.

``--generation`` plans one GPU generating a story (``configs/seed_story/generate.yaml``'s context
policy, ``--story-steps`` steps, ``--caption-tokens`` per caption): the frozen MLLM, ViT, UNet +
adapter and VAE in bf16, the KV cache at its largest over the story (the attention sink's size is
found by running its eviction rule on the story's token layout), and the largest activation of
one network at work (the UNet's with its CFG batch of 2, the VAE's decode, the LLM's prefill), for
all networks on the GPU and for ``generation.offload`` (each network on the GPU only for its phase).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from lightning_modules.components.attention_sink import (
    IMG_END,
    IMG_START,
    SLOT,
    TEXT,
    SinkSettings,
    TokenLog,
    sink_keep_indices,
)
from lightning_modules.components.codecs import sdxl_vae_architecture
from lightning_modules.components.qwen_vit import QwenViT
from tools.cli import cli_main, composed_yaml, config_command

GB = 1024**3
STAGES = {
    "stage1": "configs/seed_story/stage1_detokenizer.yaml",
    "stage2": "configs/seed_story/stage2_mllm.yaml",
    "stage3": "configs/seed_story/stage3_adaptation.yaml",
}
GENERATE = "configs/seed_story/generate.yaml"
CPU_TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]


@dataclass
class Part:
    """One model part: its parameters, what trains, its FSDP units and an activation estimate."""

    name: str
    params: int
    trainable: int
    largest_unit: int  # parameters of the largest FSDP unit (gathered whole during compute)
    activation_bytes: int
    checkpointed_activation_bytes: int
    core: tuple[str, int] = ("", 0)  # the pretrained network's own parameter count (e.g. the UNet alone)
    replicated: bool = False  # kept whole on every GPU (frozen parts outside the sharded module tree)
    per_token_bytes: int = 0  # LLM parts: a frozen forward's transient bytes per token (generation prefill)
    cache_bytes_per_token: int = 0  # LLM parts: bf16 keys + values over every layer


@dataclass
class Plan:
    stage: str
    parts: list[Part]
    gpus: int
    compute_bytes: int = 2  # bf16

    def per_gpu(self, checkpointing: bool) -> dict[str, float]:
        trainable = sum(p.trainable for p in self.parts)
        params = sum((p.trainable * 4 + (p.params - p.trainable) * self.compute_bytes) / (1 if p.replicated else self.gpus)
                     for p in self.parts)
        grads = trainable * 4 / self.gpus
        optimizer = trainable * 8 / self.gpus
        working = 2 * max((p.largest_unit for p in self.parts if not p.replicated), default=0) * self.compute_bytes
        acts = sum(p.checkpointed_activation_bytes if checkpointing else p.activation_bytes for p in self.parts)
        return {"params": params / GB, "grads": grads / GB, "optimizer": optimizer / GB, "working": working / GB,
                "activations": acts / GB, "total": (params + grads + optimizer + working + acts) / GB}


def leaf_output_bytes(model: nn.Module, run, block_types: tuple[type, ...] = ()) -> tuple[int, int, int]:
    """Bytes output by every leaf module during ``run()`` on meta, the checkpointed estimate, and
    the largest single block's internals (the transient peak of a frozen, no-grad forward).

    Checkpointed: the inputs kept at each block boundary plus the largest single block's internals.
    """
    totals = {"all": 0}
    per_block: dict[int, int] = {}
    current: list[int] = []
    boundaries = {"bytes": 0}

    def leaf_hook(module, inputs, output):
        tensors = output if isinstance(output, (tuple, list)) else [output]
        size = sum(t.numel() * 2 for t in tensors if isinstance(t, torch.Tensor))  # bf16
        totals["all"] += size
        if current:
            per_block[current[-1]] = per_block.get(current[-1], 0) + size

    def enter(module, inputs):
        current.append(id(module))
        boundaries["bytes"] += sum(t.numel() * 2 for t in inputs if isinstance(t, torch.Tensor))

    def leave(module, inputs, output):
        current.pop()

    handles = []
    for module in model.modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(leaf_hook))
        if block_types and isinstance(module, block_types):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    largest_block = max(per_block.values()) if per_block else totals["all"]
    return totals["all"], boundaries["bytes"] + largest_block, largest_block


def _count(module: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in module.parameters())
    return params, sum(p.numel() for p in module.parameters() if p.requires_grad)


def _cli(config: str, extra: list[str]):
    return cli_main([*config_command(config)[1:], *extra, *CPU_TRAINER], run=False)  # with its overlays


def _data_shape(config: str) -> dict:
    data = composed_yaml(config)["data"]["init_args"]
    size = data.get("image_size", 64)
    return {"batch": data.get("batch_size", 1), "image": size if isinstance(size, int) else size[0],
            "frames": data.get("max_images", 1)}


def unet_part(config: str, train_unet: str | None = None) -> Part:
    extra = ["--model.init_args.unet.meta_init=true"]
    if train_unet:
        extra.append(f"--model.init_args.train_unet={train_unet}")
    module = _cli(config, extra).model
    module.configure_model()
    unet = module.unet
    shape = _data_shape(config)
    latent = shape["image"] // 8
    b = shape["batch"]
    adapter = module.adapter_config
    kwargs = dict(
        encoder_hidden_states=torch.empty(b, adapter.resampler.num_queries, adapter.cross_attention_dim, device="meta"),
        added_cond_kwargs={"text_embeds": torch.empty(b, adapter.pooled_dim, device="meta"),
                           "time_ids": torch.empty(b, 6, device="meta")},
    )
    sample = torch.empty(b, unet.config.in_channels, latent, latent, device="meta")
    blocks = tuple({type(m) for m in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]})
    acts, ckpt, _ = leaf_output_bytes(unet, lambda: unet(sample, torch.zeros(b, device="meta"), **kwargs), blocks)
    params, trainable = _count(module)  # UNet + adapter (the ViT tower is built lazily, counted apart)
    # FSDP units: every transformer block and resnet block of the UNet
    units = [m for m in unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D")]
    largest = max(sum(p.numel() for p in unit.parameters()) for unit in units)
    core = ("UNet", sum(p.numel() for p in unet.parameters()))
    return Part("SD-XL UNet + adapter", params, trainable, largest, acts, ckpt, core)


def llm_part(config: str, frozen: bool = False) -> Part:
    module = _cli(config, ["--model.init_args.llm.meta_init=true"]).model
    module.configure_model()
    if frozen:
        module.requires_grad_(False)
    base = module.base_llm
    data = composed_yaml(config)
    b = data["data"]["init_args"].get("batch_size", 1)
    seq = data["model"]["init_args"].get("max_length", 1280)
    width = base.config.hidden_size
    embeds = torch.empty(b, seq, width, device="meta")
    layer_type = type(base.model.layers[0])

    def run() -> None:  # the decoder stack by hand: mask helpers read values, which meta tensors lack
        positions = torch.arange(seq, device="meta")[None]
        rotary = base.model.rotary_emb(embeds, positions)
        hidden = embeds
        for layer in base.model.layers:
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        base.model.norm(hidden)

    acts, ckpt, transient = leaf_output_bytes(base.model, run, (layer_type,))
    logits = b * seq * base.config.vocab_size * 4  # fp32 logits for the loss
    per_token = transient // (b * seq)
    if frozen:  # run under no_grad: nothing is kept beyond one layer at a time, and no loss
        acts = ckpt = transient
        logits = 0
    params, trainable = _count(module)
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in base.model.layers)
    largest = max(largest, base.get_input_embeddings().weight.numel())
    # the pretrained LLM alone: no LoRA, no duplicated trained copies, no new-token rows
    named = dict(module.llm.named_parameters())
    base_count = sum(p.numel() for n, p in named.items() if "lora_" not in n and "modules_to_save" not in n)
    base_count -= (base.get_input_embeddings().weight.shape[0] - module.base_vocab_size) * width * 2
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    return Part("LLM + resamplers" + (" (frozen)" if frozen else ""), params, trainable, largest, acts + logits, ckpt + logits,
                ("LLM", base_count), per_token_bytes=per_token, cache_bytes_per_token=kv)


def vision_part() -> Part:
    """Qwen-VL ViT-G, frozen, no activations kept, counted on the ``meta`` device: 48 blocks of
    width 1664 (MLP 8192) + its attention pool to 256 x 4096 (~1.9 B parameters)."""
    with torch.device("meta"):
        tower = QwenViT()
    params = sum(p.numel() for p in tower.parameters())
    layers = len(tower.transformer.resblocks)
    return Part("Qwen-VL ViT (frozen)", params, 0, params // layers, 0, 0, replicated=True)


def plan(stage: str, gpus: int) -> Plan:
    if stage == "stage1":
        return Plan(stage, [unet_part(STAGES["stage1"]), vision_part()], gpus)
    if stage == "stage2":
        return Plan(stage, [llm_part(STAGES["stage2"]), vision_part()], gpus)
    stage3 = yaml.safe_load(Path(STAGES["stage3"]).read_text())["model"]["init_args"]
    mllm = llm_part(STAGES["stage2"], frozen=True)  # sharded over the ranks, as stage 3 holds it
    return Plan(stage, [unet_part(STAGES["stage1"], stage3.get("train_unet", "kv")), mllm, vision_part()], gpus)


def vae_part(image_size: int) -> Part:
    """SD-XL's VAE (its published config) on ``meta``: parameters, and one image's decode."""
    with torch.device("meta"):
        vae = sdxl_vae_architecture()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.empty(1, vae.config.latent_channels, image_size // factor, image_size // factor, device="meta")
    blocks = tuple({type(b) for b in [*vae.decoder.up_blocks, vae.decoder.mid_block]})
    _, peak, _ = leaf_output_bytes(vae.decoder, lambda: vae.decoder(latents), blocks)
    params = sum(p.numel() for p in vae.parameters())
    return Part("SD-XL VAE", params, 0, params, peak, peak)


def cache_tokens(mode: str, steps: int, tokens_per_step: int, caption_tokens: int, window_frames: int,
                 settings: SinkSettings) -> int:
    """The most tokens the KV cache holds while a story of ``steps`` steps after one start frame is written."""
    if mode == "window":  # the recent frames re-encoded, then the step being written
        return min(steps + 1, window_frames) * tokens_per_step + tokens_per_step
    log = TokenLog()
    most = 0
    for frame in range(steps + 1):
        log.add(TEXT, -1, 1 + caption_tokens)  # separator (or BOS) and the caption
        log.add(IMG_START, frame)
        log.add(SLOT, frame, tokens_per_step - caption_tokens - 3)
        log.add(IMG_END, frame)
        most = max(most, len(log))
        if mode == "sink":
            log.keep(sink_keep_indices(log, settings))
    return most


def generation_plan(story_steps: int, caption_tokens: int, gpu_mems: list[float]) -> str:
    """One GPU generating a story (see the module docstring): a table per context policy."""
    gen = composed_yaml(GENERATE)["model"]["init_args"]["generation"]
    context = gen.get("context", {})
    mllm, vit = llm_part(STAGES["stage2"], frozen=True), vision_part()
    unet = unet_part(STAGES["stage1"])
    shape = _data_shape(STAGES["stage1"])
    image = shape["image"]
    vae = vae_part(image)
    unet_act = unet.checkpointed_activation_bytes * 2 // shape["batch"]  # CFG: a batch of 2
    queries = composed_yaml(STAGES["stage2"])["model"]["init_args"].get("story_format", {}).get("num_queries", 64)
    tokens_per_step = caption_tokens + queries + 3  # separator, caption, <img>, Q slots, </img>
    lines = [f"one GPU, a {story_steps}-step story at {image}px ({GENERATE}: {context.get('mode', 'sink')} by default), "
             f"{caption_tokens} tokens a caption, bf16:", "",
             "| context | KV tokens | KV GB | MLLM phase GB | image phase GB | all on GPU GB | offload GB | " +
             " | ".join(f"fits {m:g} GB (all / offload)" for m in gpu_mems) + " |", "|---" * (7 + len(gpu_mems)) + "|"]
    sink = SinkSettings(**context.get("sink", {}))
    for mode in ("dense", "window", "sink"):
        tokens = cache_tokens(mode, story_steps, tokens_per_step, caption_tokens, context.get("window_frames", 8), sink)
        kv = tokens * mllm.cache_bytes_per_token
        prefill = mllm.per_token_bytes * (tokens if mode == "window" else tokens_per_step)
        mllm_bytes = (mllm.params + vit.params) * 2 + kv + prefill
        image_bytes = (unet.params + vae.params) * 2 + max(unet_act, vae.activation_bytes)
        everything = (mllm.params + vit.params + unet.params + vae.params) * 2 + kv + max(prefill, unet_act, vae.activation_bytes)
        offload = max(mllm_bytes, image_bytes)
        fits = " | ".join(f"{'yes' if everything <= m * GB * 0.9 else 'no'} / {'yes' if offload <= m * GB * 0.9 else 'no'}"
                          for m in gpu_mems)
        lines.append(f"| {mode} | {tokens} | {kv / GB:.1f} | {mllm_bytes / GB:.1f} | {image_bytes / GB:.1f} | "
                     f"{everything / GB:.1f} | {offload / GB:.1f} | {fits} |")
    lines.append(f"\nMLLM {mllm.params / 1e9:.3f} B + ViT {vit.params / 1e9:.3f} B; UNet + adapter {unet.params / 1e9:.3f} B "
                 f"+ VAE {vae.params / 1e9:.3f} B; activations: UNet (CFG) {unet_act / GB:.2f} GB, VAE decode "
                 f"{vae.activation_bytes / GB:.2f} GB; KV {mllm.cache_bytes_per_token / 2**20:.2f} MB a token")
    return "\n".join(lines)


def report(plans: list[Plan], gpu_mems: list[float]) -> str:
    lines = ["| stage | params (B) | trainable (M) | GPUs | ckpt | params | grads | optim | working | activ. | total GB/GPU | " +
             " | ".join(f"fits {m:g} GB" for m in gpu_mems) + " |",
             "|---" * (11 + len(gpu_mems)) + "|"]
    for p in plans:
        params = sum(x.params for x in p.parts) / 1e9
        trainable = sum(x.trainable for x in p.parts) / 1e6
        for ckpt in (False, True):
            m = p.per_gpu(ckpt)
            fits = " | ".join("yes" if m["total"] <= mem * 0.9 else "no" for mem in gpu_mems)
            lines.append(f"| {p.stage} | {params:.3f} | {trainable:.1f} | {p.gpus} | {'on' if ckpt else 'off'} | "
                         f"{m['params']:.1f} | {m['grads']:.1f} | {m['optimizer']:.1f} | {m['working']:.1f} | "
                         f"{m['activations']:.1f} | {m['total']:.1f} | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a configs/seed_story stage config")
    parser.add_argument("--all", action="store_true", help="plan the three real stages")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, nargs="+", default=[24, 80], help="GPU memory in GB (several allowed)")
    parser.add_argument("--generation", action="store_true", help="plan one GPU generating a story")
    parser.add_argument("--story-steps", type=int, default=50)
    parser.add_argument("--caption-tokens", type=int, default=40, help="tokens per generated caption")
    args = parser.parse_args(argv)
    if args.generation:
        print(generation_plan(args.story_steps, args.caption_tokens, args.gpu_mem))
        return
    by_config = {v: k for k, v in STAGES.items()}
    stages = list(STAGES) if args.all else [by_config.get(str(Path(args.config)), None)]
    if stages == [None]:
        parser.error(f"--config must be one of {sorted(by_config)} (or use --all)")
    plans = [plan(s, args.gpus) for s in stages]
    print("\nper-GPU memory under FSDP full sharding, bf16 compute, AdamW; 'fits' leaves 10% headroom\n")
    print(report(plans, args.gpu_mem))
    for p in plans:
        print(f"\n{p.stage}: " + "; ".join(
            f"{x.name}: {x.params / 1e9:.3f} B params ({x.core[0] + ' ' + format(x.core[1] / 1e9, '.3f') + ' B, ' if x.core[1] else ''}"
            f"{x.trainable / 1e6:.1f} M trainable)" for x in p.parts))


if __name__ == "__main__":
    main()
