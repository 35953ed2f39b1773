"""Miniature pretrained folders in the real on-disk formats, with seeded random asymmetric weights.

    python -m tools.mini_pretrained pretrained_mini/

writes what a user puts under ``pretrained/`` (the same folder and file names), at tiny widths:
``stable-diffusion-xl-base-1.0/`` (diffusers ``unet/`` with SD-XL's block types and ``text_time``
conditioning, ``vae/``, ``scheduler/``), ``Llama-2-7b-hf/`` (``config.json``, safetensors, a
SentencePiece tokenizer), ``Qwen-VL-Chat/`` (``transformer.visual.*`` in shards with their index)
and ``qwen_vit_G.pt``, ``clip-vit-large-patch14/`` (the real-scale scorer), and the SEED-Story release (the agent ``pytorch_model.bin`` with peft-0.4
names, ``cvlm_llama2_tokenizer/``, a de-tokenizer ``pytorch_model.bin``). It prints the
arguments that run each real config on them (:func:`mini_overrides`: paths and sizes only).

Nothing real is downloaded or shipped: each writer makes a file laid out as the release lays out
its own (names, prefixes, shard index), so the loaders are tested on the real formats. Every
tensor, LayerNorms and biases included, is random, so a weight that is dropped, transposed or
read from the wrong place changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_modules.components.qwen_vit import QWEN_PREFIX, SHARD_INDEX, QwenViT, QwenViTSizes

MINI_QWEN = QwenViTSizes(image_size=84, patch_size=14, width=32, layers=2, heads=4, mlp_width=80, output_dim=256, num_queries=16)


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``module``'s state dict (names and shapes; it may live on ``meta``) with every entry drawn at
    random, scaled by the fan-in to keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        fan_in = tensor.shape[-1] if tensor.dim() > 1 else 1
        state[name] = (torch.randn(tensor.shape, generator=g) / fan_in**0.5).to(tensor.dtype)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_q.weight", "ln_kv.weight")):
            state[name] = 1 + 0.3 * torch.randn(tensor.shape, generator=g)  # norms around 1, not 0
    return state


def qwen_visual_state(sizes: QwenViTSizes = MINI_QWEN, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # only names and shapes are read
        model = QwenViT(sizes)
    return random_state(model, seed)


def write_qwen_vit_pt(path: Path, sizes: QwenViTSizes = MINI_QWEN, seed: int = 0) -> dict[str, torch.Tensor]:
    """SEED-Story's extracted ``qwen_vit_G.pt``: the visual module's state dict, no prefix."""
    state = qwen_visual_state(sizes, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def write_qwen_vl_chat(folder: Path, sizes: QwenViTSizes = MINI_QWEN, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Qwen-VL-Chat-like folder: ``transformer.visual.*`` split over two safetensors shards with
    LLM tensors beside them, a third shard of LLM tensors only (deliberately not a readable file:
    a loader that opens it fails), and the shard index."""
    state = qwen_visual_state(sizes, seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00003.safetensors": {**{QWEN_PREFIX + n: state[n] for n in names[:half]},
                                              "transformer.wte.weight": torch.randn(8, 4)},
        "model-00002-of-00003.safetensors": {**{QWEN_PREFIX + n: state[n] for n in names[half:]},
                                              "transformer.h.0.attn.c_attn.weight": torch.randn(4, 4)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / shard))
        weight_map.update({k: shard for k in tensors})
    (folder / "model-00003-of-00003.safetensors").write_bytes(b"the 7 B LLM's layers: never read by the visual loader")
    weight_map.update({f"transformer.h.{i}.mlp.w1.weight": "model-00003-of-00003.safetensors" for i in range(1, 4)})
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return state


# -- SD-XL base and a released de-tokenizer ----------------------------------------------------

# the real stage-1 adapter (the released layout) at miniature widths, and as arguments to the real config
MINI_RESAMPLER = dict(dim=32, depth=2, heads=4, dim_head=8, num_queries=9, output_dim=32, ff_mult=2)
MINI_ADAPTER = dict(proj_dims=[24, 40], pooled_dim=40, pool_heads=4)
MINI_ADAPTER_ARGS = [*(f"--model.init_args.adapter.resampler.{k}={v}" for k, v in MINI_RESAMPLER.items()),
                     *(f"--model.init_args.adapter.{k}={v}" for k, v in MINI_ADAPTER.items())]


def mini_adapter_config():
    """The :class:`SDXLAdapterConfig` that :data:`MINI_ADAPTER_ARGS` give the real stage-1 config."""
    from lightning_modules.components.perceiver import PerceiverConfig
    from lightning_modules.components.sdxl_adapter import SDXLAdapterConfig

    return SDXLAdapterConfig(layout="seed_story", proj_dims=tuple(MINI_ADAPTER["proj_dims"]), pooled_dim=MINI_ADAPTER["pooled_dim"],
                             pool_heads=MINI_ADAPTER["pool_heads"],
                             resampler=PerceiverConfig(input_dim=MINI_QWEN.output_dim, **MINI_RESAMPLER))
MINI_VISION_ARGS = [f"--model.init_args.vision_encoder.{k}={v}" for k, v in dict(
    path="null", image_size=MINI_QWEN.image_size, patch_size=MINI_QWEN.patch_size, hidden_size=MINI_QWEN.width,
    num_layers=MINI_QWEN.layers, num_heads=MINI_QWEN.heads, intermediate_size=MINI_QWEN.mlp_width,
    output_dim=MINI_QWEN.output_dim, num_queries=MINI_QWEN.num_queries).items()]


def write_mini_clip(folder: Path, seed: int = 0) -> Path:
    """A ``clip-vit-large-patch14``-like folder (``save_pretrained`` CLIPModel + CLIPProcessor), tiny and
    random: what ``configs/seed_story/generate.yaml`` scores with (FID features, CLIP-I, CLIP-T)."""
    from transformers import CLIPModel, CLIPProcessor

    from datamodules.synthetic_world import BACKGROUND_NAMES, CHARACTER_NAMES
    from evaluation.evaluator import StoryEvaluator, tiny_clip_config, train_caption_word_tokenizer

    tokenizer = train_caption_word_tokenizer([" ".join([*CHARACTER_NAMES, *BACKGROUND_NAMES, "a", "the", "and", "in"])])
    torch.manual_seed(seed)
    clip = CLIPModel(tiny_clip_config(len(tokenizer), image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                                      text_width=32, text_layers=1, projection_dim=32))
    clip.save_pretrained(str(folder))
    processor = StoryEvaluator(clip, tokenizer, (), ()).image_processor()
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return Path(folder)


def write_mini_sdxl(folder: Path, cross_attention_dim: int = 64, pooled_dim: int = 40, seed: int = 0) -> Path:
    """A ``stable-diffusion-xl-base-1.0``-like folder: a diffusers ``unet/`` with SD-XL's block types
    and ``text_time`` added conditioning, and a ``vae/``, both saved with ``save_pretrained``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=1, cross_attention_dim=cross_attention_dim, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=pooled_dim + 6 * 8,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32, scaling_factor=0.13025)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(folder / "scheduler")  # SD-XL base's
    return folder


def write_released_detokenizer(path: Path, unet: torch.nn.Module, adapter: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A released de-tokenizer ``pytorch_model.bin``: ``unet.*`` with only every attention's
    ``to_k`` / ``to_v`` (changed from the base) and ``resampler.*`` of the released adapter."""
    g = torch.Generator().manual_seed(seed)
    state = {f"unet.{k}": v + 0.1 * torch.randn(v.shape, generator=g)
             for k, v in unet.state_dict().items() if k.endswith(("to_k.weight", "to_v.weight"))}
    state.update({f"resampler.{k}": v for k, v in random_state(adapter.resampler, seed + 1).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


# -- the agent: a Llama under peft-0.4 LoRA, its tokenizer, the two resamplers ----------------

MINI_CAPTIONS = [
    "Mia walks to the park with her red kite.", "Leo and Mia eat apples under the big tree.",
    "The dog runs home before the rain.", "Mia finds a small blue box in the garden.",
    "Leo opens the box and a bird flies out.", "They wave goodbye as the sun goes down.",
]
# the LLM's width is the mini ViT-G's output width, as in the release (4096 both): no kv projection in the resamplers
MINI_LLAMA = dict(hidden_size=MINI_QWEN.output_dim, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
MINI_LORA = dict(r=4, alpha=8)  # scale 2, as the release's r 16 / alpha 32
MINI_AGENT_QUERIES = 4  # Q: a 2 x 2 grid of slots per frame
MINI_AGENT_TOKENS = MINI_QWEN.num_queries  # N ViT tokens per frame (a 4 x 4 grid)
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
NORMS = ["input_layernorm", "post_attention_layernorm"]


def write_llama_tokenizer(folder: Path, added: list[str] | None = None) -> Path:
    """A Llama tokenizer folder as the slow ``LlamaTokenizer`` saved it: a SentencePiece
    ``tokenizer.model`` (byte fallback, identity normalisation, whitespace kept, like Llama's) and,
    with ``added``, those tokens numbered in the given order after the base vocabulary."""
    import io

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(MINI_CAPTIONS * 20 + ["[INST]"] * 20), model_writer=model,
                                   vocab_size=320, model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    base = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False, **specials}
    if added:
        (folder / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(added)}))
        specials["additional_special_tokens"] = config["additional_special_tokens"] = list(added)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


def write_mini_llama(folder: Path, seed: int = 0) -> Path:
    """A ``Llama-2-7b-hf``-like folder: a tiny ``LlamaForCausalLM`` (``save_pretrained``) and its tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    write_llama_tokenizer(folder)
    vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **MINI_LLAMA)).save_pretrained(folder)
    return folder


def write_released_agent(path: Path, base_folder: Path, tokenizer_folder: Path, with_base: bool = True,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """A released agent ``pytorch_model.bin`` over the mini Llama, its tokenizer with the story
    tokens in a permuted order beside it (``tokenizer_folder``), written from the documented names:
    ``llm.base_model.model.*`` with ``lora_A`` / ``lora_B`` (non-zero) on every projection, the
    frozen projections (``with_base``), the norms as ``original_module`` + changed
    ``modules_to_save.default``, the embeddings and head whole, ``inv_freq`` buffers; the resamplers."""
    from safetensors.torch import load_file

    from datamodules.tokenizer import IMG_END, IMG_START, image_slot_tokens
    from lightning_modules.components.qwen_resampler import QwenResampler

    g = torch.Generator().manual_seed(seed)
    story = [IMG_START, IMG_END, *image_slot_tokens(MINI_AGENT_QUERIES)]
    permuted = [story[i] for i in torch.randperm(len(story), generator=g).tolist()]
    write_llama_tokenizer(tokenizer_folder, added=permuted)
    base = load_file(base_folder / "model.safetensors")
    width, vocab = MINI_LLAMA["hidden_size"], base["model.embed_tokens.weight"].shape[0] + len(story)
    head_dim = width // MINI_LLAMA["num_attention_heads"]
    inv_freq = 1.0 / MINI_LLAMA["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    llm = "llm.base_model.model."
    state = {f"{llm}model.embed_tokens.weight": torch.randn(vocab, width, generator=g) * 0.02,
             f"{llm}lm_head.weight": torch.randn(vocab, width, generator=g) / width**0.5}
    for layer in range(MINI_LLAMA["num_hidden_layers"]):
        stem = f"model.layers.{layer}."
        for proj in PROJECTIONS:
            weight = base[f"{stem}{proj}.weight"]
            if with_base:
                state[f"{llm}{stem}{proj}.weight"] = weight
            # B A of the size of W itself: the LoRA visibly changes every projection, activations stay sane
            state[f"{llm}{stem}{proj}.lora_A.default.weight"] = torch.randn(MINI_LORA["r"], weight.shape[1], generator=g) / weight.shape[1] ** 0.5
            state[f"{llm}{stem}{proj}.lora_B.default.weight"] = torch.randn(weight.shape[0], MINI_LORA["r"], generator=g) * 0.01
        for norm in NORMS:
            weight = base[f"{stem}{norm}.weight"]
            state[f"{llm}{stem}{norm}.original_module.weight"] = weight
            state[f"{llm}{stem}{norm}.modules_to_save.default.weight"] = weight + 0.3 * torch.randn(weight.shape, generator=g)
        state[f"{llm}{stem}self_attn.rotary_emb.inv_freq"] = inv_freq
    state[f"{llm}model.norm.original_module.weight"] = base["model.norm.weight"]
    state[f"{llm}model.norm.modules_to_save.default.weight"] = base["model.norm.weight"] + 0.3 * torch.randn(width, generator=g)
    for name, grid in (("input_resampler", 2), ("output_resampler", 4)):  # 16 ViT tokens -> 4 slots -> 16 features
        with torch.device("meta"):
            resampler = QwenResampler(grid, width, num_heads=4, kv_dim=width)
        tensors = random_state(resampler, seed + grid)  # pos_embed too: it must be read from the file
        tensors["ln_q.weight"], tensors["ln_kv.weight"] = (1 + 0.3 * torch.randn(width, generator=g) for _ in range(2))
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def mini_agent_args(base: Path) -> list[str]:
    """The real stage-2 config at miniature widths over the mini Llama folder: only paths and sizes differ."""
    return [*MINI_AGENT_ARGS, f"--model.init_args.llm.path={base}", f"--model.init_args.llm.config={base / 'config.json'}",
            f"--model.init_args.story_format.tokenizer={base}"]


MINI_AGENT_ARGS = [
    f"--model.init_args.story_format.num_queries={MINI_AGENT_QUERIES}",
    "--model.init_args.input_resampler={kind: qwen, heads: 4}", "--model.init_args.output_resampler={kind: qwen, heads: 4}",
    f"--model.init_args.lora.r={MINI_LORA['r']}", f"--model.init_args.lora.alpha={MINI_LORA['alpha']}",
    "--model.init_args.gradient_checkpointing=false", *MINI_VISION_ARGS,
]


# -- the whole pretrained/ folder -------------------------------------------------------------

def write_mini_pretrained(root: Path) -> dict[str, Path]:
    """Every pretrained input of ``configs/seed_story/`` under ``root``, as ``pretrained/`` holds them."""
    from diffusers import UNet2DConditionModel

    from lightning_modules.components.sdxl_adapter import SDXLAdapter

    root = Path(root)
    paths = dict(sdxl=root / "stable-diffusion-xl-base-1.0", llama=root / "Llama-2-7b-hf", qwen=root / "Qwen-VL-Chat",
                 vit=root / "qwen_vit_G.pt", agent=root / "SEED-Story" / "Agent_7B_George" / "pytorch_model.bin",
                 tokenizer=root / "SEED-Story" / "cvlm_llama2_tokenizer",
                 detokenizer=root / "SEED-Story" / "Detokenizer_George" / "pytorch_model.bin",
                 clip=root / "clip-vit-large-patch14")
    write_qwen_vl_chat(paths["qwen"])
    write_qwen_vit_pt(paths["vit"])
    write_mini_sdxl(paths["sdxl"])
    write_released_detokenizer(paths["detokenizer"], UNet2DConditionModel.from_pretrained(paths["sdxl"], subfolder="unet"),
                               SDXLAdapter(mini_adapter_config()))
    write_mini_llama(paths["llama"])
    write_released_agent(paths["agent"], paths["llama"], paths["tokenizer"])
    write_mini_clip(paths["clip"])
    return paths


def mini_overrides(root: Path) -> dict[str, list[str]]:
    """The arguments that run each real config on :func:`write_mini_pretrained`'s folders: paths and sizes only."""
    root = Path(root)
    vit = [*MINI_VISION_ARGS, f"--model.init_args.vision_encoder.path={root / 'Qwen-VL-Chat'}"]
    sdxl = root / "stable-diffusion-xl-base-1.0"
    return {
        "stage1": [*vit, *MINI_ADAPTER_ARGS, f"--model.init_args.unet.path={sdxl}", f"--model.init_args.vae_path={sdxl}"],
        "stage2": [*mini_agent_args(root / "Llama-2-7b-hf"), f"--model.init_args.vision_encoder.path={root / 'Qwen-VL-Chat'}"],
        # no Inception file here: FID on the CLIP's features
        "generate": [f"--model.init_args.evaluator_dir={root / 'clip-vit-large-patch14'}", "--model.init_args.inception_weights_path=null"],
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write (e.g. pretrained_mini/)")
    out = Path(parser.parse_args(argv).out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: remove it or choose another folder")
    for name, path in write_mini_pretrained(out).items():
        print(f"{name:12s} {path}")
    for stage, args in mini_overrides(out).items():
        print(f"\n{stage} (after the config's --config arguments):\n  " + " \\\n  ".join(args))


if __name__ == "__main__":
    main()
