"""Stage-2 evaluation pieces: the bigram baseline, token picking, named characters (decoding: test_generation_parity)."""

import math

import torch

from lightning_modules.components.caption_decoding import DecodeSettings, pick_token
from tools.evaluate_mllm import BigramModel, named_characters


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
