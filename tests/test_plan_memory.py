"""The memory planner on the real configs: no weights, right parameter counts, a report."""

import pytest

from tools import plan_memory


@pytest.mark.slow
def test_planner_counts_the_real_models_and_reports(capsys):
    plan_memory.main(["--all", "--gpus", "8", "--gpu-mem", "24", "80"])
    out = capsys.readouterr().out
    assert "UNet 2.567 B" in out or "UNet 2.568 B" in out
    assert "LLM 6.738 B" in out
    table = [line for line in out.splitlines() if line.startswith(("| stage1 ", "| stage2 ", "| stage3 "))]
    assert len(table) == 6  # three stages, with and without activation checkpointing


def test_plan_arithmetic():
    part = plan_memory.Part("x", params=8_000, trainable=2_000, largest_unit=100, activation_bytes=10, checkpointed_activation_bytes=1)
    per_gpu = plan_memory.Plan("s", [part], gpus=2).per_gpu(checkpointing=False)
    gb = plan_memory.GB
    assert per_gpu["params"] * gb == (2_000 * 4 + 6_000 * 2) / 2
    assert per_gpu["grads"] * gb == 2_000 * 4 / 2 and per_gpu["optimizer"] * gb == 2_000 * 8 / 2
    assert per_gpu["working"] * gb == 2 * 100 * 2 and per_gpu["activations"] * gb == 10


def test_replicated_frozen_parts_count_whole_on_every_gpu():
    sharded = plan_memory.Part("unet", params=8_000, trainable=2_000, largest_unit=100, activation_bytes=0,
                               checkpointed_activation_bytes=0)
    frozen = plan_memory.Part("vit", params=1_000, trainable=0, largest_unit=500, activation_bytes=0,
                              checkpointed_activation_bytes=0, replicated=True)
    per_gpu = plan_memory.Plan("s", [sharded, frozen], gpus=4).per_gpu(checkpointing=False)
    gb = plan_memory.GB
    assert per_gpu["params"] * gb == (2_000 * 4 + 6_000 * 2) / 4 + 1_000 * 2
    assert per_gpu["working"] * gb == 2 * 100 * 2  # a replicated part is never gathered


def test_cache_tokens_follow_each_context_policy():
    from lightning_modules.components.attention_sink import SinkSettings

    per_step, caption = 107, 40  # 40 caption tokens + 64 slots + 3 markers
    sink = SinkSettings(start_tokens=4, before_image=4, image_head=8, image_tail=8, after_image=4, recent_tokens=1024,
                        boundary_images=8)
    dense = plan_memory.cache_tokens("dense", 50, per_step, caption, 8, sink)
    assert dense == 51 * per_step  # the start frame and 50 steps, all kept
    assert plan_memory.cache_tokens("window", 50, per_step, caption, 8, sink) == 9 * per_step
    kept = plan_memory.cache_tokens("sink", 50, per_step, caption, 8, sink)
    # bounded by the recent window, the start and each boundary image's head and tail, plus one new step
    assert kept <= 4 + 1024 + 9 * (4 + 8 + 8 + 4) + per_step
    assert kept == plan_memory.cache_tokens("sink", 200, per_step, caption, 8, sink)  # it stops growing


@pytest.mark.slow
def test_generation_plan_needs_offload_on_24_gb(capsys):
    plan_memory.main(["--generation", "--gpu-mem", "24", "80"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(("| dense", "| sink"))]
    assert len(rows) == 2
    for row in rows:
        everything, offload = float(row[5]), float(row[6])
        assert offload < 24 * 0.9 < everything  # only offloaded generation fits a 24 GB card
        assert row[7] == "no / yes" and row[8].rstrip(" |") == "yes / yes"
