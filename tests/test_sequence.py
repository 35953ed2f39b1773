import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from datamodules.sequence import IGNORE_INDEX, layout_story, layout_text, pad_stories, pad_text
from datamodules.tokenizer import StoryTokens, add_story_tokens, train_caption_tokenizer

Q = 4
CAPTIONS = ["Bolt is alone in the meadow.", "Pip enters on the left. Bolt watches.", "Bolt jumps high. Pip watches."]


@pytest.fixture(scope="module")
def tok():
    tokenizer = train_caption_tokenizer(CAPTIONS * 3 + ["Mira waves hello."], vocab_size=300)
    added = add_story_tokens(tokenizer, Q)
    assert added == Q + 2  # <img>, </img> and the Q slots; [INST] is already one token
    return tokenizer, StoryTokens.of(tokenizer, Q)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_story_sequences(stories, tokenizer, t, supervise="last", max_length=None, padding_side="right"):
    """Lay out each story on its own (as the DataLoader workers do), then pad them together."""
    samples = [layout_story([_ids(tokenizer, c) for c in story], t, supervise, max_length) for story in stories]
    return pad_stories(samples, t.pad, len(t.slots), supervise, padding_side)


def test_exact_layout_of_a_three_frame_story(tok):
    tokenizer, t = tok
    seq = build_story_sequences([CAPTIONS], tokenizer, t)
    c0, c1, c2 = (_ids(tokenizer, c) for c in CAPTIONS)
    image = [t.img_start, *t.slots, t.img_end]
    expected = [t.bos, *c0, *image, *t.separator, *c1, *image, *t.separator, *c2, *image, t.eos]
    assert seq.input_ids[0].tolist() == expected
    assert len(t.separator) == 1 and tokenizer.decode(t.separator) == "[INST]"
    # labels: only "[INST] cap_2 <img>" and EOS; never image slots or </img>
    labelled = [i for i, label in enumerate(seq.labels[0].tolist()) if label != IGNORE_INDEX]
    last_text = len(expected) - 1 - len(image) - len(c2) - len(t.separator)
    assert labelled == list(range(last_text, last_text + len(t.separator) + len(c2) + 1)) + [len(expected) - 1]
    assert (seq.labels[0][labelled] == seq.input_ids[0][labelled]).all()
    # slots: two context images (frames 0, 1) and one target (frame 2), pointing at slot tokens
    assert seq.context_frames.tolist() == [[0, 0], [0, 1]] and seq.target_frames.tolist() == [[0, 2]]
    for slots in (*seq.context_slots, *seq.target_slots):
        assert seq.input_ids.flatten()[slots].tolist() == t.slots
        assert seq.input_ids.flatten()[slots[0] - 1] == t.img_start and seq.input_ids.flatten()[slots[-1] + 1] == t.img_end
    assert seq.position_ids[0].tolist() == list(range(len(expected)))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_keeps_positions_masks_and_slots_right(tok, side):
    tokenizer, t = tok
    alone = build_story_sequences([CAPTIONS[:2]], tokenizer, t)
    seq = build_story_sequences([CAPTIONS, CAPTIONS[:2]], tokenizer, t, padding_side=side)
    n = alone.lengths[0]
    width = seq.input_ids.shape[1]
    cols = slice(width - n, width) if side == "left" else slice(0, n)
    assert seq.input_ids[1, cols].tolist() == alone.input_ids[0].tolist()
    assert seq.position_ids[1, cols].tolist() == list(range(n))
    assert seq.attention_mask[1].sum() == n and seq.attention_mask[1, cols].all()
    assert (seq.labels[1][seq.attention_mask[1] == 0] == IGNORE_INDEX).all()
    row1 = seq.target_frames[:, 0] == 1
    assert seq.input_ids.flatten()[seq.target_slots[row1][0]].tolist() == t.slots


@pytest.mark.parametrize("side", ["left", "right"])
def test_each_target_knows_its_step_text_padded_and_masked(tok, side):
    """target_text: the opening, caption and <img> of each target step, in order; the mask marks the padding."""
    tokenizer, t = tok
    seq = build_story_sequences([CAPTIONS, CAPTIONS[:2]], tokenizer, t, supervise="all", padding_side=side)
    flat = seq.input_ids.flatten()
    assert seq.target_frames.tolist() == [[0, 1], [0, 2], [1, 1]]
    longest = max(len(_ids(tokenizer, c)) for c in CAPTIONS[1:])
    assert seq.target_text.shape == seq.target_text_mask.shape == (3, len(t.separator) + longest + 1)
    for (row, frame), text, mask in zip(seq.target_frames.tolist(), seq.target_text, seq.target_text_mask):
        expected = [*t.separator, *_ids(tokenizer, CAPTIONS[frame]), t.img_start]
        assert flat[text[mask]].tolist() == expected and int(mask.sum()) == len(expected)
        assert (text // seq.input_ids.shape[1] == row).all()  # padding points inside the row too


def test_token_budget_drops_whole_leading_steps(tok):
    tokenizer, t = tok
    full = build_story_sequences([CAPTIONS], tokenizer, t)
    short = build_story_sequences([CAPTIONS], tokenizer, t, max_length=full.lengths[0] - 1)
    assert short.dropped_steps == 1
    assert short.context_frames.tolist() == [[0, 1]] and short.target_frames.tolist() == [[0, 2]]
    assert short.input_ids[0, :2].tolist() == [t.bos, _ids(tokenizer, CAPTIONS[1])[0]]  # restarts with BOS cap_1


def test_supervise_all_labels_every_step_and_targets_frames_1_to_k(tok):
    tokenizer, t = tok
    seq = build_story_sequences([CAPTIONS], tokenizer, t, supervise="all")
    assert seq.target_frames.tolist() == [[0, 1], [0, 2]] and seq.context_frames.tolist() == [[0, 0], [0, 1]]
    labelled = seq.input_ids[0][seq.labels[0] != IGNORE_INDEX].tolist()
    for caption in CAPTIONS:
        ids = _ids(tokenizer, caption)
        assert any(labelled[i : i + len(ids)] == ids for i in range(len(labelled)))
    # the query copy and the context copy of frame 1 share positions
    g, c = seq.target_slots[0], seq.context_slots[1]
    assert seq.position_ids.flatten()[g].tolist() == seq.position_ids.flatten()[c].tolist()


def test_supervise_all_sees_exactly_what_each_last_sequence_sees(tok):
    """With the block mask, one 'all' pass gives the logits of k separate 'last' passes."""
    tokenizer, t = tok
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)).eval()
    frame_features = torch.randn(3, Q, 32)

    def run(seq):
        embeds = model.get_input_embeddings()(seq.input_ids).reshape(-1, 32)
        for (_, frame), slots in zip(seq.context_frames.tolist(), seq.context_slots):
            embeds[slots] = frame_features[frame]
        out = model(inputs_embeds=embeds.view(1, -1, 32), attention_mask=seq.attention_mask, position_ids=seq.position_ids)
        return out.logits[0]

    with torch.no_grad():
        together = build_story_sequences([CAPTIONS], tokenizer, t, supervise="all")
        all_logits = run(together)
        for k in (1, 2):
            alone = build_story_sequences([CAPTIONS[: k + 1]], tokenizer, t, supervise="last")
            last_logits = run(alone)
            # the query block of frame k: same logits in both layouts
            g_all = together.target_slots[k - 1]
            g_last = alone.target_slots[0]
            assert torch.allclose(all_logits[g_all], last_logits[g_last], atol=1e-5)
            # the last step's text tokens too
            step = len(t.separator) + len(_ids(tokenizer, CAPTIONS[k]))
            start_last = int(g_last[0]) - 1 - step
            idx_all = (together.position_ids[0] == alone.position_ids[0, start_last]).nonzero().flatten()[-1]
            assert torch.allclose(all_logits[idx_all : idx_all + step], last_logits[start_last : start_last + step], atol=1e-5)


def test_text_layout_is_the_story_layout_without_its_images(tok):
    """The LLM's text pretraining reads each caption and step opening with the ids stage 2 gives them."""
    tokenizer, t = tok
    story = build_story_sequences([CAPTIONS], tokenizer, t).input_ids[0].tolist()
    image_tokens = {t.img_start, t.img_end, *t.slots}
    text = pad_text([layout_text([_ids(tokenizer, c) for c in CAPTIONS], t)], t.pad)
    assert text.input_ids[0].tolist() == [i for i in story if i not in image_tokens]
    # every token is a label but BOS (what predicts it is nothing)
    labels = text.labels[0].tolist()
    assert labels[0] == IGNORE_INDEX and labels[1:] == text.input_ids[0, 1:].tolist()


def test_text_layout_pads_and_keeps_the_budget(tok):
    tokenizer, t = tok
    ids = [_ids(tokenizer, c) for c in CAPTIONS]
    full = layout_text(ids, t)
    short = layout_text(ids, t, max_length=len(full.ids) - 1)
    assert short.dropped_steps == 1 and short.ids[:2] == [t.bos, ids[1][0]]  # restarts with BOS cap_1
    cut = layout_text(ids, t, max_length=4)  # even the last step alone is too long
    assert cut.dropped_steps == 2 and cut.truncated_captions == 1
    assert cut.ids == [t.bos, *ids[2][:2], t.eos]
    batch = pad_text([full, short], t.pad)
    assert batch.input_ids.shape == (2, len(full.ids))
    assert batch.attention_mask.sum(1).tolist() == [len(full.ids), len(short.ids)]
    assert (batch.labels[1, len(short.ids):] == IGNORE_INDEX).all() and batch.dropped_steps == 1
