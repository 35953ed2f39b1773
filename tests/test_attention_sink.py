"""The multimodal attention sink and the story generator's context policies."""

import torch

from lightning_modules.components import attention_sink as sink
from lightning_modules.components.story_generator import ContextPolicy, GenerationSettings, StoryGenerator
from tests.test_story_mllm import _batch, _module, tokenizer_dir  # noqa: F401  (fixture)


def _story_log(images: int, text: int = 5, q: int = 4) -> sink.TokenLog:
    log = sink.TokenLog()
    for f in range(images):
        log.add(sink.TEXT, count=text)
        log.add(sink.IMG_START, f)
        log.add(sink.SLOT, f, q)
        log.add(sink.IMG_END, f)
    return log


def test_kept_positions_follow_the_sink_rules():
    log = _story_log(images=4)  # each step: 5 text, <img>, 4 slots, </img> = 11 tokens
    settings = sink.SinkSettings(start_tokens=2, before_image=1, image_head=2, image_tail=2, after_image=1,
                                 recent_tokens=5, boundary_images=1)
    kept = sink.sink_keep_indices(log, settings)
    # start: 0, 1; image 0 (first, always): text before 4, <img> 5, slot 6, slot 9, </img> 10, after 11;
    # image 3 (most recent behind the window): 37, 38, 39, 42, 43; recent window: 39..43
    assert kept == [0, 1, 4, 5, 6, 9, 10, 11, 37, 38, 39, 40, 41, 42, 43]
    assert not {16, 17, 20, 21, 27, 28} & set(kept)  # images 1 and 2 lost their boundaries


def test_the_sink_cache_is_bounded_as_the_story_grows():
    settings = sink.SinkSettings(recent_tokens=40, boundary_images=2)
    sizes = []
    log = sink.TokenLog()
    for step in range(60):
        log.add(sink.TEXT, count=7)
        log.add(sink.IMG_START, step)
        log.add(sink.SLOT, step, 16)
        log.add(sink.IMG_END, step)
        log.keep(sink.sink_keep_indices(log, settings))
        sizes.append(len(log))
    bound = settings.start_tokens + settings.recent_tokens + 3 * (settings.before_image + settings.image_head + settings.image_tail + settings.after_image)
    assert max(sizes) <= bound and sizes[-1] == sizes[-20]


def test_rerotated_keys_equal_keys_computed_at_the_new_positions(tokenizer_dir):  # noqa: F811
    """Layer-0 keys depend only on token and position: shifting by re-rotation must be exact."""
    from transformers import DynamicCache

    module = _module(tokenizer_dir).eval()
    base = module.base_llm
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        full = DynamicCache()
        base.model(input_ids=ids, past_key_values=full, use_cache=True)
        sink.evict(full, [0, 1, 7, 8, 9, 10, 11], base.model.rotary_emb)
        fresh = DynamicCache()
        kept = ids[:, [0, 1, 7, 8, 9, 10, 11]]
        base.model(input_ids=kept, past_key_values=fresh, use_cache=True)
    assert torch.allclose(full.layers[0].keys, fresh.layers[0].keys, atol=1e-5)
    assert torch.allclose(full.layers[0].values, fresh.layers[0].values, atol=1e-6)


def _generator(module, mode, **sink_kw):
    policy = ContextPolicy(mode=mode, window_frames=2, sink=sink.SinkSettings(**sink_kw))
    settings = GenerationSettings(steps=6, context=policy, draw_images=False, seed=0)
    return StoryGenerator(module, detokenizer=None, settings=settings)


def test_sink_with_a_window_that_keeps_everything_equals_dense(tiny_world, tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    module = _module(tokenizer_dir).eval()
    batch = _batch(tiny_world, n=1, max_images=2)
    start = batch["vit_pixels"][0, :2]
    dense = _generator(module, "dense").generate(start, batch["captions"][0][:2])
    sunk = _generator(module, "sink", recent_tokens=10**6).generate(start, batch["captions"][0][:2])
    assert dense.captions == sunk.captions
    for a, b in zip(dense.steps, sunk.steps):
        assert torch.allclose(a.features, b.features, atol=1e-5)


def test_sink_evicts_and_frees_memory_while_dense_grows(tiny_world, tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    module = _module(tokenizer_dir).eval()
    batch = _batch(tiny_world, n=1, max_images=2)
    start = batch["vit_pixels"][0, :1]
    gen = _generator(module, "sink", recent_tokens=24, boundary_images=1)
    gen.settings.steps = 12
    story = gen.generate(start, batch["captions"][0][:1])
    dense = _generator(module, "dense")
    dense.settings.steps = 12
    grown = dense.generate(start, batch["captions"][0][:1])
    sink_bytes = [s.kv_bytes for s in story.steps[1:]]
    dense_bytes = [s.kv_bytes for s in grown.steps[1:]]
    assert dense_bytes == sorted(dense_bytes) and dense_bytes[-1] > 2 * dense_bytes[2]
    assert max(sink_bytes[4:]) < dense_bytes[-1] / 2 and max(sink_bytes[6:]) <= max(sink_bytes[:6])


def test_window_policy_reencodes_only_recent_frames(tiny_world, tokenizer_dir):  # noqa: F811
    module = _module(tokenizer_dir).eval()
    batch = _batch(tiny_world, n=1, max_images=2)
    story = _generator(module, "window").generate(batch["vit_pixels"][0, :1], batch["captions"][0][:1])
    tokens = [s.cached_tokens for s in story.steps[1:]]
    assert max(tokens[2:]) <= max(tokens[:3]) + 30  # bounded by two frames, not growing with the story
