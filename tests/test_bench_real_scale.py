"""``bench/real_scale.py`` at miniature size on the CPU: the real configs build, train a step of each
stage and generate stories under every context policy and sampler (no timing is checked)."""

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "real_scale.py"


def _load_script():
    """The script as a module (``bench/`` is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("real_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_benchmark_runs_at_miniature_size_and_prints_its_tables(capsys):
    _load_script().main(["--scale", "mini", "--device", "cpu", "--iters", "1", "--table-steps", "1", "--story-steps", "2"])
    out = capsys.readouterr().out
    for stage in ("stage 1", "stage 2", "stage 3"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {stage} |"))
        assert float(re.search(r"\| ([\d.]+) (images|tokens)/s", row).group(1)) > 0
    rows = [line for line in out.splitlines() if line.startswith(("| euler-", "| dpmpp-"))]
    assert len(rows) == 6  # two samplers x dense / window / sink
    assert all(int(row.split(" | ")[3]) > 0 for row in rows)  # UNet milliseconds per step
    assert re.search(r"a 2-step story, sink, dpmpp-20, offload: [\d.]+ s", out)
