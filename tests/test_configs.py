"""Every YAML under configs/ parses through train.py (a typo fails here, not after hours)."""

from pathlib import Path

import pytest
import yaml

from tools.cli import cli_main

YAMLS = sorted(p for p in Path("configs").rglob("*.yaml") if p.parent.name in ("tiny", "seed_story"))
CONFIGS = [p for p in YAMLS if p.read_text().startswith("# python train.py ")]
PARTS = [p for p in YAMLS if p not in CONFIGS]  # shared pieces (e.g. the visual tokenizer)


def test_there_are_configs_and_every_shared_part_is_used():
    assert {p.parent.name for p in CONFIGS} == {"tiny", "seed_story"}
    for part in PARTS:
        users = [c for c in CONFIGS if c.parent == part.parent and f": {part.name}" in c.read_text()]
        assert len(users) >= 2, f"{part} is shared by fewer than two configs"


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_print_config(path, capsys):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# python train.py "), "every config starts with its command"
    subcommand = first_line.split()[3]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, "--print_config", "--config", str(path)])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


@pytest.mark.parametrize("trainer", sorted(Path("configs/trainer").glob("*.yaml")), ids=str)
def test_trainer_configs_compose_with_a_stage(trainer, capsys):
    assert trainer.read_text().startswith("#")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--print_config", "--config", "configs/tiny/stage2_mllm.yaml", "--config", str(trainer)])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]["class_path"]
    assert strategy.startswith(("lightning.pytorch.strategies.", "lightning_modules.components.strategies."))
