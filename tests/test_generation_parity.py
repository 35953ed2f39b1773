"""Generation feeds a story exactly as training lays it out (one story format, two forms).

Teacher forcing through the step-by-step generator (true frames as context, true captions given)
must regress the same features and give the same next-token logits as the whole-story
``forward_story`` pass over that story.
"""

import pytest
import torch

from datamodules.sequence import layout_story, pad_stories
from lightning_modules.components.caption_decoding import DecodeSettings
from lightning_modules.components.feature_codebook import CodebookConfig
from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings, StoryGenerator
from tests.test_story_mllm import _batch, _module, tokenizer_dir  # noqa: F401  (fixture)

RESIDUAL = dict(residual_features=True, queries_from_previous=True)


@pytest.mark.parametrize("kwargs", [{}, RESIDUAL, {**RESIDUAL, "regress_from": "step"}, {**RESIDUAL, "edit_from": "start"},
                                    {"queries_from_previous": True, "codebook": CodebookConfig(size=16)}],
                         ids=["plain", "residual", "step", "edit_start", "codebook"])
def test_teacher_forced_generation_equals_forward_story(tiny_world, tokenizer_dir, kwargs):  # noqa: F811
    """With ``regress_from: step`` the targets' captions differ in length, so the padded text mask is checked too."""
    torch.manual_seed(0)
    module = _module(tokenizer_dir, supervise="all", **kwargs).eval()
    if module.codebook is not None:  # codes to decode to (a fitted codebook's are k-means centres)
        module.codebook.set_codes(torch.randn_like(module.codebook.codes))
    batch = _batch(tiny_world, n=1, max_images=4)
    captions = batch["captions"][0]
    with torch.no_grad():
        whole = module.forward_story(batch)
        if module.codebook is not None:  # keep's bias set so that about half the tokens keep and half take a code
            margins = whole.code_logits[..., 1:].amax(-1) - whole.code_logits[..., 0]
            module.codebook.head.bias[0] += margins.quantile(0.5) + 1e-2  # not on a tie: rounding would decide it
            whole = module.forward_story(batch)
        features, _ = module.story_features(batch)
        generator = StoryGenerator(module, None, GenerationSettings(draw_images=False, context=ContextPolicy(mode="dense")))
        context = generator.new_context()
        generator._feed_frame(context, captions[0], features[0], 0)
        regressed, step_logits = [], []
        for k in range(1, len(captions)):
            edited = features[0] if module.edit_from == "start" else features[k - 1]
            _, predicted, hidden = generator.write_step(context, k, captions[k], None, edited=edited)
            generator.close_image(context, features[k], k)  # teacher forcing: the true frame is read next
            regressed.append(predicted)
            step_logits.append(module.base_llm.lm_head(hidden))
    # features: one target per frame 1..k, in order
    assert whole.sequence.target_frames[:, 1].tolist() == list(range(1, len(captions)))
    torch.testing.assert_close(torch.stack(regressed), whole.predicted_features, atol=1e-5, rtol=0)
    if module.codebook is not None:  # both keep and code decisions were compared
        choices = whole.code_logits.argmax(-1)
        assert (choices == 0).any() and (choices != 0).any()
    # logits: every text token of each step ([INST] caption <img>) sees the same context in both forms
    expected = []
    for k in range(1, len(captions)):
        img_start = int(whole.sequence.target_slots[k - 1, 0]) - 1  # the <img> before frame k's query slots
        text = len(module.story_format.tokens.separator) + len(module.story_format.caption_ids(captions[k]))
        expected.append(whole.logits[0, img_start - text : img_start + 1])
    torch.testing.assert_close(torch.cat(step_logits), torch.cat(expected), atol=1e-5, rtol=0)


def test_caption_decoding_is_greedy_on_a_full_recomputation(tiny_world, tokenizer_dir):  # noqa: F811
    """Each token of the one decoding loop is the argmax of a cache-free pass over everything before it."""
    torch.manual_seed(0)
    module = _module(tokenizer_dir).eval()
    batch = _batch(tiny_world, n=1, max_images=3)
    features, _ = module.story_features(batch)
    captions = batch["captions"][0][:2]
    fmt = module.story_format
    settings = GenerationSettings(draw_images=False, context=ContextPolicy(mode="dense"), decode=DecodeSettings(max_new_tokens=8))
    generator = StoryGenerator(module, None, settings)
    with torch.no_grad():
        context = generator.new_context()
        for i, (caption, frame) in enumerate(zip(captions, features[:2])):
            generator._feed_frame(context, caption, frame, i)
        ids = generator.decode_caption(context, context.feed_ids(fmt.tokens.step_opening(first=False)), None)
        assert len(ids) > 0
        assert generator.next_caption(features[:2], captions) == fmt.decode_text(ids)  # the tools' entry, same loop
        # the same prompt, laid out by the whole-story form: two context frames, then [INST] + the decoded ids
        whole = pad_stories([layout_story([*map(fmt.caption_ids, captions), ids], fmt.tokens)], fmt.tokens.pad,
                            fmt.num_queries, "last")
        base = module.base_llm
        embeds = base.get_input_embeddings()(whole.input_ids)[0]
        slots = module.input_resampler(features[:2]).reshape(-1, embeds.shape[-1])
        embeds = embeds.index_copy(0, whole.context_slots.flatten(), slots)
        logits = base.lm_head(base.model(inputs_embeds=embeds[None], position_ids=whole.position_ids).last_hidden_state[0])
    last_separator = int(whole.context_slots[-1, -1]) + 1 + len(fmt.tokens.separator)  # after the slots: </img> [INST]
    assert logits[last_separator : last_separator + len(ids)].argmax(-1).tolist() == ids


def test_projected_generation_draws_and_reads_the_regression_re_standardised_by_the_towers_final_norm(tiny_world, tokenizer_dir):  # noqa: F811
    """``project_features``: each step's features are the teacher-forced regression put through
    ``FrozenVisionEncoder.project``; an encoder read without its final LayerNorm is refused up front."""
    import dataclasses

    from tests.test_story_mllm import TINY_ENCODER

    settings = GenerationSettings(draw_images=False, context=ContextPolicy(mode="dense"), project_features=True)
    with pytest.raises(ValueError, match="post_layernorm"):
        StoryGenerator(_module(tokenizer_dir, supervise="all", **RESIDUAL), None, settings)
    torch.manual_seed(0)
    encoder = dataclasses.replace(TINY_ENCODER, post_layernorm=True)
    module = _module(tokenizer_dir, supervise="all", vision_encoder=encoder, **RESIDUAL).eval()
    norm = module.vision_encoder._final_norm(module.vision_encoder.tower)
    with torch.no_grad():  # an affine that is not the identity, as a trained tower's
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.3)
    batch = _batch(tiny_world, n=1, max_images=4)
    captions = batch["captions"][0]
    with torch.no_grad():
        whole = module.forward_story(batch)
        features, _ = module.story_features(batch)
        generator = StoryGenerator(module, None, settings)
        context = generator.new_context()
        generator._feed_frame(context, captions[0], features[0], 0)
        projected = []
        for k in range(1, len(captions)):
            projected.append(generator.write_step(context, k, captions[k], None, edited=features[k - 1])[1])
            generator.close_image(context, features[k], k)
    z = (whole.predicted_features - norm.bias) / norm.weight
    expected = torch.nn.functional.layer_norm(z, z.shape[-1:], eps=norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(torch.stack(projected), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, whole.predicted_features, atol=1e-3)
