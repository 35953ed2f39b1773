"""The story-teller's language model: a causal LM with story tokens, LoRA and trainable norms.

Built from a local folder (real scale: Llama-2-7b-hf) or from an architecture config (a dict or
a JSON file such as ``lightning_modules/components/llama2_7b_config.json``) with random init;
``meta_init`` builds the architecture on the ``meta`` device without weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from datamodules.sequence import IGNORE_INDEX

log = logging.getLogger(__name__)

LLAMA2_7B_CONFIG = str(Path(__file__).with_name("llama2_7b_config.json"))


@dataclass
class LLMSpec:
    """Where the LLM comes from (see the module docstring)."""

    path: str | None = None
    config: dict[str, Any] | str | None = None
    meta_init: bool = False
    trust_remote_code: bool = False
    seed: int = 0  # random init seed when built from a config
    attn_implementation: str = "sdpa"  # torch's fused attention (flash / memory-efficient kernels); "eager" to debug


@dataclass
class LoRASpec:
    """LoRA on the attention and MLP projections; norms, embeddings and LM head fully trained."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # trained and saved whole inside the adapter (new story tokens live in the embeddings)
    modules_to_save: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "norm"])


def llm_architecture(spec: LLMSpec) -> Any:
    if spec.config is not None:
        raw = json.loads(Path(spec.config).read_text()) if isinstance(spec.config, str) else dict(spec.config)
        raw.pop("architectures", None)
        model_type = raw.pop("model_type", "llama")
        if model_type != "llama":
            return AutoConfig.for_model(model_type, **raw)
        return LlamaConfig(**raw)
    if spec.path is None:
        raise ValueError("llm: give `path` (a local model folder) or `config` (an architecture)")
    _check_folder(spec.path)
    return AutoConfig.from_pretrained(spec.path, local_files_only=True, trust_remote_code=spec.trust_remote_code)


def _check_folder(path: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"llm.path {path} is not a folder; point it at a local Hugging Face model (e.g. "
                                "Llama-2-7b-hf, or the tiny pipeline's runs/tiny_llm/export/llm, made by configs/tiny/language_model.yaml)")


def build_llm(spec: LLMSpec, vocab_size: int | None = None) -> PreTrainedModel:
    """Load or build the LLM; ``vocab_size`` sets a config-built model's base vocabulary (tiny tokenizer)."""
    if spec.path is not None and not spec.meta_init:
        _check_folder(spec.path)
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, local_files_only=True, trust_remote_code=spec.trust_remote_code, dtype=torch.float32,
            attn_implementation=spec.attn_implementation,
        )
        return model.train()  # from_pretrained hands it over in eval mode; it is built to be trained
    config = llm_architecture(spec)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    if spec.meta_init:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn_implementation)


def grow_vocabulary(model: PreTrainedModel, new_size: int) -> int:
    """Resize embeddings (and head) to ``new_size``; new rows start at the mean of the old rows.

    The mean keeps the new tokens' logits and hidden states in the range of the trained ones,
    so training starts from a sensible place instead of random directions.
    """
    old_size = model.get_input_embeddings().weight.shape[0]
    if new_size <= old_size:
        return 0
    model.resize_token_embeddings(new_size, mean_resizing=False)
    if model.get_input_embeddings().weight.is_meta:
        return new_size - old_size
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[old_size:] = matrix[:old_size].mean(0, keepdim=True)
    return new_size - old_size


def add_lora(model: PreTrainedModel, lora: LoRASpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (for FSDP wrapping and activation checkpointing)."""
    base = model
    while hasattr(base, "base_model") and base.base_model is not base:
        base = base.base_model
    for candidate in (getattr(base, "model", None), getattr(getattr(base, "model", None), "model", None)):
        layers = getattr(candidate, "layers", None)
        if layers is not None:
            return list(layers)
    return []


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each position against the next token's label, and the accuracy of its argmax,
    over the labelled positions (``IGNORE_INDEX`` elsewhere). ``logits`` (B, T, V), ``labels`` (B, T)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        supervised = labels != IGNORE_INDEX
        accuracy = (logits.argmax(-1)[supervised] == labels[supervised]).float().mean()
    return ce, accuracy
