"""A released agent converts into the stage-2 export strictly and computes what the release computes.

The release is a miniature in the released layout (``tools/mini_pretrained.py``): a Llama-2-like folder
(tiny ``LlamaForCausalLM`` + SentencePiece tokenizer) and an agent ``pytorch_model.bin`` with
peft-0.4 names, non-zero ``lora_B``, changed norms, ``inv_freq`` buffers and a tokenizer whose story
tokens are numbered in a permuted order. The expected values are computed apart from the project's
code, from the documented math with plain tensor ops: SentencePiece's own encoding of each text
segment (what the slow tokenizer did), Llama with hand-merged ``W + (alpha / r) B A``, and Qwen's
resampler (``tests/test_qwen_vit.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.mllm_export import load_mllm
from tests.test_qwen_vit import reference_resampler
from tools.convert import convert_agent
from tools.mini_pretrained import (
    MINI_AGENT_QUERIES,
    MINI_AGENT_TOKENS,
    MINI_CAPTIONS,
    MINI_LLAMA,
    MINI_LORA,
    NORMS,
    PROJECTIONS,
    mini_agent_args,
    write_llama_tokenizer,
    write_mini_llama,
    write_released_agent,
)

CONFIGS = ["configs/seed_story/data.yaml", "configs/seed_story/stage2_mllm.yaml"]
LLM = "llm.base_model.model."


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    base = write_mini_llama(root / "Llama-2-7b-hf")
    state = write_released_agent(root / "agent" / "pytorch_model.bin", base, root / "cvlm_llama2_tokenizer")
    overrides = mini_agent_args(base)
    export = convert_agent(root / "agent" / "pytorch_model.bin", root / "cvlm_llama2_tokenizer", CONFIGS, root / "export", overrides)
    return root, state, overrides, export


# -- the independent computation ----------------------------------------------------------------


def _rms(x, weight, eps=MINI_LLAMA["rms_norm_eps"]):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, positions):
    d = x.shape[-1]
    inv_freq = 1.0 / MINI_LLAMA["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    angles = positions[:, None].float() * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def _merged(state, name):
    """``W + (alpha / r) B A`` of one projection, by hand."""
    scale = MINI_LORA["alpha"] / MINI_LORA["r"]
    return state[f"{LLM}{name}.weight"] + scale * state[f"{LLM}{name}.lora_B.default.weight"] @ state[f"{LLM}{name}.lora_A.default.weight"]


def reference_llama(state, embeds):
    """Causal Llama over ``(T, H)`` input embeddings: hidden states and logits (released ids)."""
    t, width = embeds.shape
    heads = MINI_LLAMA["num_attention_heads"]
    d = width // heads
    positions = torch.arange(t)
    causal = torch.full((t, t), float("-inf")).triu(1)
    x = embeds
    for layer in range(MINI_LLAMA["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w = {proj.split(".")[1]: _merged(state, p + proj) for proj in PROJECTIONS}
        h = _rms(x, state[f"{LLM}{p}input_layernorm.modules_to_save.default.weight"])
        q, k, v = ((h @ w[n].T).reshape(t, heads, d).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = _rotate(q, positions), _rotate(k, positions)
        attention = (q @ k.transpose(1, 2) / math.sqrt(d) + causal).softmax(-1) @ v
        x = x + attention.transpose(0, 1).reshape(t, width) @ w["o_proj"].T
        h = _rms(x, state[f"{LLM}{p}post_attention_layernorm.modules_to_save.default.weight"])
        x = x + (F.silu(h @ w["gate_proj"].T) * (h @ w["up_proj"].T)) @ w["down_proj"].T
    hidden = _rms(x, state[f"{LLM}model.norm.modules_to_save.default.weight"])
    return hidden, hidden @ state[f"{LLM}lm_head.weight"].T


def _resampler(state, name, x):
    tensors = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
    return reference_resampler(tensors, x, heads=4, eps=1e-5)


def reference_ids(root, captions):
    """The released agent's sequence: BOS, each caption (a later one as the one string ``[INST]`` +
    caption), ``<img>``, Q slots, ``</img>``; each text segment encoded by SentencePiece itself."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(root / "cvlm_llama2_tokenizer" / "tokenizer.model"))
    added = AutoTokenizer.from_pretrained(root / "cvlm_llama2_tokenizer").get_vocab()
    slots = [added[f"<img_{i:05d}>"] for i in range(MINI_AGENT_QUERIES)]
    ids = [sp.bos_id()]
    for j, caption in enumerate(captions):
        ids += sp.encode(caption if j == 0 else "[INST]" + caption) + [added["<img>"], *slots, added["</img>"]]
    return ids + [sp.eos_id()], slots


# -- tests -------------------------------------------------------------------------------------------


def test_the_converted_agent_computes_what_the_release_computes(release):
    root, state, _, export = release
    module = load_mllm(export)
    captions = MINI_CAPTIONS[:3]
    features = torch.randn(3, MINI_AGENT_TOKENS, MINI_LLAMA["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = module.forward_story({"captions": [captions]}, features, torch.arange(3)[None])

    # the tokenisation: our ids, read as strings, are the released agent's ids
    ids, slots = reference_ids(root, captions)
    ours = module.story_format.tokenizer.convert_ids_to_tokens(out.sequence.input_ids[0].tolist())
    from transformers import AutoTokenizer

    released = AutoTokenizer.from_pretrained(root / "cvlm_llama2_tokenizer")
    assert released.convert_tokens_to_ids(ours) == ids

    # the forward pass: context slots from the input resampler, Llama with merged LoRA, output resampler
    ids = torch.tensor(ids)
    embeds = state[f"{LLM}model.embed_tokens.weight"][ids].clone()
    starts = [i + 1 for i, token in enumerate(ids.tolist()) if token == released.convert_tokens_to_ids("<img>")]
    for frame, start in enumerate(starts[:-1]):
        embeds[start: start + MINI_AGENT_QUERIES] = _resampler(state, "input_resampler", features[frame: frame + 1])[0]
    hidden, logits = reference_llama(state, embeds)
    rows = torch.tensor(released.convert_tokens_to_ids(module.story_format.tokenizer.convert_ids_to_tokens(
        list(range(len(module.story_format.tokenizer))))))
    torch.testing.assert_close(out.logits[0], logits[:, rows], atol=1e-5, rtol=1e-5)
    regressed = _resampler(state, "output_resampler", hidden[None, starts[-1]: starts[-1] + MINI_AGENT_QUERIES])
    torch.testing.assert_close(out.predicted_features, regressed, atol=1e-5, rtol=1e-5)
    assert ids[starts[-1]: starts[-1] + MINI_AGENT_QUERIES].tolist() == slots


def test_a_release_without_the_frozen_projections_takes_them_from_the_base(release, tmp_path):
    root, _, overrides, export = release
    write_released_agent(tmp_path / "agent.bin", root / "Llama-2-7b-hf", tmp_path / "tokenizer", with_base=False)
    lean = convert_agent(tmp_path / "agent.bin", tmp_path / "tokenizer", CONFIGS, tmp_path / "export", overrides)
    story = {"captions": [MINI_CAPTIONS[:2]]}
    features = torch.randn(2, MINI_AGENT_TOKENS, MINI_LLAMA["hidden_size"])
    with torch.no_grad():
        a = load_mllm(lean).forward_story(story, features, torch.arange(2)[None]).logits
        b = load_mllm(export).forward_story(story, features, torch.arange(2)[None]).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("damage, message", [
    ("missing_lora", "missing (1): base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"),
    ("wrong_shape", "wrong shape (1): base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
    ("other_base", "different from the base model at llm.path"),
    ("stray", "unexpected tensors outside llm.*"),
])
def test_a_damaged_release_fails_naming_the_tensor(release, tmp_path, damage, message):
    root, state, overrides, _ = release
    state = dict(state)
    if damage == "missing_lora":
        del state[f"{LLM}model.layers.1.mlp.down_proj.lora_B.default.weight"]
    elif damage == "wrong_shape":
        state[f"{LLM}model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(MINI_LORA["r"] + 1, MINI_LLAMA["hidden_size"])
    elif damage == "other_base":
        state[f"{LLM}model.layers.0.self_attn.q_proj.weight"] = state[f"{LLM}model.layers.0.self_attn.q_proj.weight"] + 1
    else:
        state["visual_encoder.proj"] = torch.zeros(2)
    torch.save(state, tmp_path / "agent.bin")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        convert_agent(tmp_path / "agent.bin", root / "cvlm_llama2_tokenizer", CONFIGS, tmp_path / "export", overrides)


def test_a_tokenizer_without_the_image_tokens_is_refused(release, tmp_path):
    root, _, overrides, _ = release
    plain = write_llama_tokenizer(tmp_path / "plain_llama_tokenizer")
    with pytest.raises(ValueError, match="lacks 6 of the story tokens .*cvlm_llama2_tokenizer"):
        convert_agent(root / "agent" / "pytorch_model.bin", plain, CONFIGS, tmp_path / "export", overrides)


def test_the_norms_and_lora_are_those_of_the_file(release):
    """Spot check by name: a trained norm and a LoRA factor are the file's (not the base's, not re-initialised)."""
    _, state, _, export = release
    llm = load_mllm(export).llm
    named = dict(llm.named_parameters())
    for norm in NORMS:
        key = f"model.layers.1.{norm}.modules_to_save.default.weight"
        assert torch.equal(named[f"base_model.model.{key}"], state[LLM + key])
    key = "model.layers.0.mlp.up_proj.lora_B.default.weight"
    assert torch.equal(named[f"base_model.model.{key}"], state[LLM + key])
