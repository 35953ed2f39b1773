"""Will a real-scale stage fit? A per-GPU memory plan under FSDP, computed without any weights.

    python -m tools.plan_memory --config configs/seed_story/stage2_mllm.yaml --gpus 8 --gpu-mem 80
    python -m tools.plan_memory --all --gpus 8 --gpu-mem 24 80

The config's model is built on the ``meta`` device (no weights are read). Per GPU, with every
parameter fully sharded over the GPUs (FSDP / ZeRO-3):

- parameters: trainable ones kept in fp32, frozen ones in the compute dtype (bf16); frozen parts
  that live outside the sharded module tree (the ViT in every stage, stage 3's MLLM) are whole
  on every GPU, as the modules place them;
- gradients: fp32, trainable parameters only; optimizer: two fp32 AdamW moments per trainable;
- working copy: the largest FSDP unit gathered unsharded in bf16 (twice, for prefetching);
- activations: a meta-device forward pass with the config's batch shape, summing what every
  leaf module outputs (an upper bound on what autograd keeps); with activation checkpointing,
  only the inputs of each block plus one block's internals.

Stage 3 is planned from the stage-1 and stage-2 configs (its de-tokenizer is stage 1's, its
frozen MLLM stage 2's), with stage 3's choice of what trains.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from lightning_modules.components.qwen_vit import QwenViT
from tools.cli import cli_main, composed_yaml, config_command

GB = 1024**3
STAGES = {
    "stage1": "configs/seed_story/stage1_detokenizer.yaml",
    "stage2": "configs/seed_story/stage2_mllm.yaml",
    "stage3": "configs/seed_story/stage3_adaptation.yaml",
}
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
    return Part("LLM + resamplers" + (" (frozen)" if frozen else ""), params, trainable, largest, acts + logits, ckpt + logits,
                ("LLM", base_count))


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
    mllm = llm_part(STAGES["stage2"], frozen=True)
    mllm.replicated = True  # stage 3 places the frozen MLLM on every rank
    return Plan(stage, [unet_part(STAGES["stage1"], stage3.get("train_unet", "kv")), mllm, vision_part()], gpus)


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
    args = parser.parse_args(argv)
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
