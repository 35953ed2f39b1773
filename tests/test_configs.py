"""Every YAML under configs/ parses through train.py with exactly the command of its first line (a
typo fails here, not after hours); overlays are shared, and every value is written once."""

from pathlib import Path

import pytest
import yaml

from tests.conftest import config_command, config_files, llm_args
from tools.cli import cli_main

YAMLS = sorted(p for p in Path("configs").rglob("*.yaml") if p.parent.name in ("tiny", "seed_story"))
CONFIGS = [p for p in YAMLS if p.read_text().startswith("# python train.py ")]
# composed by the configs' commands (configs/tiny/data.yaml, ...)
OVERLAYS = sorted({Path(f) for c in CONFIGS for f in config_files(str(c))} - set(CONFIGS))
PARTS = [p for p in YAMLS if p not in CONFIGS and p not in OVERLAYS]  # named inside configs (e.g. the visual tokenizer)


def _composers(overlay: Path) -> list[Path]:
    return [c for c in CONFIGS if overlay in [Path(f) for f in config_files(str(c))]]


def _leaves(tree, prefix: tuple = ()):
    """(key path, value) of every leaf of a YAML mapping (a list is one value)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, tree


def test_there_are_configs_and_every_shared_part_is_used():
    assert {p.parent.name for p in CONFIGS} == {"tiny", "seed_story"}
    for part in PARTS:
        users = [c for c in CONFIGS if c.parent == part.parent and f": {part.name}" in c.read_text()]
        assert len(users) >= 2, f"{part} is shared by fewer than two configs"


def test_commands_compose_existing_overlays_then_the_config_itself():
    for config in CONFIGS:
        files = [Path(f) for f in config_files(str(config))]
        assert files[-1] == config, f"{config}: its command must name it last"
        assert all(f.is_file() for f in files), f"{config}: {files}"
    assert {o.parent.name for o in OVERLAYS} == {"tiny", "seed_story"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=str)
def test_every_overlay_is_shared_and_no_composer_repeats_its_values(overlay):
    assert overlay.read_text().startswith("#"), f"{overlay}: start with a comment saying what it is and who composes it"
    users = _composers(overlay)
    assert len(users) >= 2, f"{overlay} is composed by fewer than two configs"
    # class_path is the exception: a config names its data class so that it still parses alone
    shared = {key: value for key, value in _leaves(yaml.safe_load(overlay.read_text())) if key[-1] != "class_path"}
    for config in users:
        written = dict(_leaves(yaml.safe_load(config.read_text())))
        repeated = [".".join(key) for key, value in shared.items() if key in written and written[key] == value]
        assert not repeated, f"{config} writes again what {overlay} holds: {repeated}"


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_the_run_root_is_written_once(path):
    text = path.read_text()
    root = yaml.safe_load(text)["trainer"]["default_root_dir"]
    assert text.count(root) == 1, f"{path}: write {root} once (trainer.default_root_dir), then ${{trainer.default_root_dir}}"


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_print_config(path, capsys):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# python train.py "), "every config starts with its command"
    subcommand, *configs = config_command(str(path))
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, "--print_config", *configs])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]
    assert printed["data"]["init_args"]["image_root"] and printed["data"]["init_args"]["test_files"]  # from the overlay
    root, model = printed["trainer"]["default_root_dir"], printed["model"]["init_args"]
    assert model.get("export_dir", f"{root}/export") == f"{root}/export"  # interpolated from the root
    assert model.get("output_dir", root) == root


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_a_run_root_given_on_the_command_line_moves_every_folder_under_it(path, capsys):
    subcommand, *configs = config_command(str(path))
    with pytest.raises(SystemExit):
        cli_main([subcommand, "--print_config", *configs, "--trainer.default_root_dir=/elsewhere/run"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model.get("export_dir", "/elsewhere/run/export") == "/elsewhere/run/export"
    assert model.get("output_dir", "/elsewhere/run") == "/elsewhere/run"


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_a_config_alone_still_parses(path, capsys):
    subcommand = config_command(str(path))[0]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, "--print_config", "--config", str(path)])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["data"]["class_path"]


def _named_configs(words: list[str]) -> list[str]:
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"]


def test_quickstart_and_readme_run_every_config_with_its_command():
    import re

    import quickstart

    commands = [s.command[s.command.index("train.py") + 1:] for s in quickstart.STAGES if "train.py" in s.command]
    commands += [line.split() for line in re.findall(r"python train\.py [^`#\n]*", Path("README.md").read_text())]
    checked = 0
    for words in commands:
        named = _named_configs(words)
        stage = [c for c in named if Path(c) in CONFIGS]
        if stage:  # the config's own command, then e.g. a configs/trainer/ file
            assert named[:len(config_files(stage[0]))] == config_files(stage[0]), " ".join(words)
            checked += 1
    assert checked >= 10


def test_loggers_without_a_folder_log_under_the_run_root(tmp_path):
    cli = cli_main([*config_command("configs/tiny/stage1_detokenizer.yaml")[1:], f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.accelerator=cpu"], run=False)
    csv, wandb = cli.trainer.loggers
    assert csv.log_dir == str(tmp_path / "lightning_logs" / "version_0")
    assert wandb.save_dir == str(tmp_path) and wandb._wandb_init["name"] == tmp_path.name
    assert wandb._wandb_init["project"] == "seed-story-tiny"


@pytest.mark.parametrize("trainer", sorted(Path("configs/trainer").glob("*.yaml")), ids=str)
def test_trainer_configs_compose_with_a_stage(trainer, capsys):
    assert trainer.read_text().startswith("#")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--print_config", *config_command("configs/tiny/stage2_mllm.yaml")[1:], "--config", str(trainer)])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]["class_path"]
    assert strategy.startswith(("lightning.pytorch.strategies.", "lightning_modules.components.strategies."))


def _run_length_schedules() -> list[Path]:
    """The configs whose scheduler has a ``total_steps`` (a schedule over the whole run)."""
    import importlib
    import inspect

    found = []
    for path in CONFIGS:
        scheduler = (yaml.safe_load(path.read_text())["model"].get("init_args") or {}).get("scheduler")
        if scheduler:
            module, _, name = scheduler["class_path"].rpartition(".")
            if "total_steps" in inspect.signature(getattr(importlib.import_module(module), name)).parameters:
                found.append(path)
    return found


@pytest.mark.parametrize("path", _run_length_schedules(), ids=str)
def test_a_step_schedule_lasts_the_run_and_a_disagreeing_length_fails_before_training(path, tiny_llm):
    import torch
    from jsonargparse import dict_to_namespace

    from tools.cli import composed_yaml, fill_schedule_length

    command = config_command(str(path))[1:]
    if "runs/tiny_llm/export/llm" in path.read_text():  # stage 2 reads its LLM's architecture when built
        command += llm_args(tiny_llm)
    with pytest.raises(ValueError, match="total_steps=12 but trainer.max_steps=737"):  # checked before anything is built
        cli_main([*command, "--trainer.max_steps=737", "--model.init_args.scheduler.init_args.total_steps=12",
                  "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    config = dict_to_namespace(composed_yaml(str(path)))
    fill_schedule_length(config)
    assert config.model.init_args.scheduler.init_args.total_steps == config.trainer.max_steps
    if "detokenizer_dir" not in path.read_text():  # the others need their earlier stages' exports to build
        cli = cli_main([*command, "--trainer.max_steps=737", "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        assert cli.model.scheduler_factory(optimizer).total_steps == 737


def test_null_on_the_command_line_clears_a_nested_field_and_keeps_the_rest():
    """``--model.init_args.unet.path=null`` means None (jsonargparse alone would read the string
    'None' there), and the dataclass keeps every other value its config gave it."""
    from tools.cli import nested_nulls_as_dicts

    assert nested_nulls_as_dicts(["--model.init_args.unet.path=null", "--model.init_args.scheduler=null", "--x.y=null"]) == \
        ["--model.init_args.unet={path: null}", "--model.init_args.scheduler=null", "--x.y=null"]
    cli = cli_main([*config_command("configs/seed_story/stage1_detokenizer.yaml")[1:], "--trainer.accelerator=cpu",
                    "--model.init_args.unet.path=null", "--model.init_args.vision_encoder.path=null",
                    "--model.init_args.vision_encoder.num_layers=2"], run=False)
    vision, unet = cli.model.vision_config, cli.model.unet_spec
    assert vision.path is None and unet.path is None
    assert vision.backend == "qwen_vl" and vision.image_size == 448 and vision.num_layers == 2
    assert unet.config == "lightning_modules/components/sdxl_unet_config.json"


def test_settings_replaced_names_each_model_setting_the_run_does_not_use():
    from jsonargparse import Namespace

    from tools.cli import settings_replaced

    given = Namespace(class_path="m.M", init_args=Namespace(lr=0.1, export_dir="runs/b/export", depth=2))
    assert settings_replaced(given, given.clone()) == {}
    used = Namespace(class_path="m.M", init_args=Namespace(lr=0.01, export_dir="runs/a/export", depth=2))
    assert settings_replaced(given, used) == {"export_dir": ("runs/b/export", "runs/a/export"), "lr": (0.1, 0.01)}
    assert settings_replaced(None, used) == {}
