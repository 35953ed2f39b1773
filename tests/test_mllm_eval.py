"""Stage-2 evaluation pieces: the bigram baseline, caption decoding, named characters."""

import math

import torch

from lightning_modules.components.caption_decoding import (
    DecodeSettings,
    decode_next_caption_ids,
    pick_token,
    prompt_embeddings,
)
from lightning_modules.evaluate_mllm import BigramModel, named_characters
from tests.test_story_mllm import _batch, _module, tokenizer_dir  # noqa: F401  (fixture)


def test_bigram_nll_matches_a_hand_computation():
    model = BigramModel([[0, 1, 2], [0, 1, 1]], vocab_size=3, lam=0.5)
    # P(1|0) = .5 * 2/2 + .5 * unigram(1); unigram counts: 1 + [0, 3, 1] -> [1, 4, 2] / 7
    p10 = 0.5 * 1.0 + 0.5 * 4 / 7
    p21 = 0.5 * 1 / 2 + 0.5 * 2 / 7  # row 1 saw 1->2 once and 1->1 once
    nll, count = model.nll([0, 1, 2])
    assert count == 2 and math.isclose(nll, -math.log(p10) - math.log(p21), rel_tol=1e-6)


def test_named_characters():
    assert named_characters("Bolt and Pip meet. Zed watches.") == {"Bolt", "Pip", "Zed"}
    assert named_characters("Nobody here.") == set()


def test_pick_token_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    assert pick_token(logits, DecodeSettings()) == 1
    settings = DecodeSettings(temperature=1.0, top_p=0.9)
    draws = [pick_token(logits, settings, torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(draws) <= {1, 3} and len(set(draws)) == 2  # nucleus keeps the two likely tokens
    assert draws == [pick_token(logits, settings, torch.Generator().manual_seed(s)) for s in range(20)]


def test_cached_greedy_decoding_equals_full_recomputation(tiny_world, tokenizer_dir):  # noqa: F811
    """Each decoded token is the argmax of a full, cache-free forward pass over prompt + tokens so far."""
    torch.manual_seed(0)
    module = _module(tokenizer_dir).eval()
    batch = _batch(tiny_world, n=1, max_images=3)
    features, _ = module.story_features(batch)
    captions = batch["captions"][0][:2]
    ids = decode_next_caption_ids(module, features[:2], captions, DecodeSettings(max_new_tokens=8))
    assert len(ids) > 0
    prompt, embeds = prompt_embeddings(module, features[:2], captions)
    base = module.base_llm
    with torch.no_grad():
        full = torch.cat([embeds, base.get_input_embeddings()(torch.tensor(ids))])
        positions = torch.arange(len(full))[None]
        logits = base.lm_head(base.model(inputs_embeds=full[None], position_ids=positions).last_hidden_state[0])
    n = len(prompt.input_ids)
    assert logits[n - 1 : n - 1 + len(ids)].argmax(-1).tolist() == ids
