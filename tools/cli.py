"""The project's LightningCLI: what ``python train.py {fit,validate,test,predict} --config FILE`` runs.

A LightningCLI in subclass mode: the YAML names the LightningModule and DataModule classes
(``model.class_path``, ``data.class_path``), so one entry serves all three stages. The merged
config is saved next to the run's logs, and everything is seeded (``seed_everything``).
Checkpoints without an explicit ``dirpath`` go to ``<default_root_dir>/checkpoints`` with a
``last.ckpt``, so ``python train.py fit --config X --ckpt_path last`` resumes an interrupted run.
The tools (``python -m tools.consolidate``, ``python -m tools.plan_memory``) build modules from
the same configs through :func:`cli_main`.

Configs compose: a stage config's first line is its whole command, overlays included (e.g.
``# python train.py fit --config configs/tiny/data.yaml --config configs/tiny/logging.yaml
--config configs/tiny/stage1_detokenizer.yaml``; :func:`config_command` reads it). A logger whose
config leaves ``save_dir`` unset writes under ``trainer.default_root_dir``, and a W&B run without
a ``name`` is named after that folder, so the run root is written once, in the stage config.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.loggers import WandbLogger

from callbacks.data_health import DataHealthCallback
from callbacks.resilience import NonFiniteGuard, RNGStateCallback, guard_checkpoint_loading, resumable_checkpoints

log = logging.getLogger(__name__)


def story_format_of(model: Any) -> Any:
    """The model's :class:`~datamodules.story_format.StoryFormat` (None for models without one)."""
    return getattr(model, "story_format", None)


def config_command(path: str | Path) -> list[str]:
    """The subcommand and ``--config`` arguments that a config's first line names, e.g.
    ``["fit", "--config", "configs/tiny/data.yaml", ..., "--config", "configs/tiny/stage1_detokenizer.yaml"]``
    for ``# python train.py fit --config configs/tiny/data.yaml ... --config configs/tiny/stage1_detokenizer.yaml``."""
    words = Path(path).read_text().splitlines()[0].split()
    command = words[3:]
    configs = command[1:]
    if words[:3] != ["#", "python", "train.py"] or not configs or len(configs) % 2 or set(configs[::2]) != {"--config"}:
        raise ValueError(f"{path}: the first line must be its command, '# python train.py <subcommand> --config FILE ...'")
    return command


def config_files(path: str | Path) -> list[str]:
    """The config files, in order, that a config's command composes (overlays first, the config itself last)."""
    return config_command(path)[2::2]


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def composed_yaml(path: str | Path) -> dict:
    """A config as written, merged over the overlays its command composes (mappings key by key, later
    files win; no defaults, interpolations left as written): what tools read without building the CLI."""
    merged: dict = {}
    for file in config_files(path):
        merged = _merge(merged, yaml.safe_load(Path(file).read_text()) or {})
    return merged


def _class_of(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def fill_logger_dirs(trainer: Namespace) -> None:
    """Give every configured logger whose ``save_dir`` is unset (None) the run's root
    (``trainer.default_root_dir``, the current folder when that is unset, as the Trainer does), and
    every W&B logger without a ``name`` that folder's name."""
    root = str(trainer.get("default_root_dir") or os.getcwd())
    loggers = trainer.get("logger")
    for spec in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(spec, Namespace) or not spec.get("class_path"):
            continue
        cls = _class_of(spec.class_path)
        if spec.get("init_args") is None:
            spec.init_args = Namespace()
        if "save_dir" in inspect.signature(cls).parameters and spec.init_args.get("save_dir") is None:
            spec.init_args.save_dir = root
        if issubclass(cls, WandbLogger) and spec.init_args.get("name") is None:
            spec.init_args.name = Path(root).name


def fill_schedule_length(config: Namespace) -> None:
    """A step schedule lasts the run: a model's ``scheduler`` whose ``total_steps`` is unset gets
    ``trainer.max_steps``; one written differently fails here, before anything is built."""
    scheduler = (config.get("model") or Namespace()).get("init_args", Namespace()).get("scheduler")
    if not isinstance(scheduler, Namespace) or not scheduler.get("class_path"):
        return
    if "total_steps" not in inspect.signature(_class_of(scheduler.class_path)).parameters:
        return
    if scheduler.get("init_args") is None:
        scheduler.init_args = Namespace()
    max_steps, total = config.trainer.get("max_steps"), scheduler.init_args.get("total_steps")
    if max_steps is None or max_steps < 0:
        if total is None:
            raise ValueError(f"{scheduler.class_path} needs total_steps: set trainer.max_steps (the schedule then lasts the run)")
        return
    if total is None:
        scheduler.init_args.total_steps = max_steps
    elif total != max_steps:
        raise ValueError(f"model.init_args.scheduler.init_args.total_steps={total} but trainer.max_steps={max_steps}: "
                         "remove total_steps from the config, the schedule takes the run's length")


def settings_replaced(given: Namespace | None, used: Namespace | None) -> dict[str, tuple[Any, Any]]:
    """The model's ``init_args`` the command line gave that differ from those the run uses: ``{name: (given, used)}``.

    Resuming (``--ckpt_path``), LightningCLI merges the checkpoint's hyperparameters over the command line's, so a
    run goes on as it was trained: a changed setting (a learning rate, ``export_dir`` under another run root) is
    not used, and this says which.
    """
    if given is None or used is None:
        return {}
    before, after = given.as_dict().get("init_args") or {}, used.as_dict().get("init_args") or {}
    return {name: (before[name], after.get(name)) for name in sorted(before) if before[name] != after.get(name)}


def nested_nulls_as_dicts(args: list[str]) -> list[str]:
    """``--a.init_args.b.c=null`` -> ``--a.init_args.b={c: null}``: the same override, in the form that parses.

    jsonargparse (4.53) reads a ``null`` given to a field of a dataclass inside a class's
    ``init_args`` as the string ``'None'`` (``--model.init_args.unet.path=null`` would look for a
    folder named ``None``); a dict with that one key merges into the dataclass and keeps ``None``.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        parent, _, leaf = key.rpartition(".")
        if sep and value == "null" and key.startswith("--") and ".init_args." in f"{parent}." and not parent.endswith("init_args"):
            arg = f"{parent}={{{leaf}: null}}"
        out.append(arg)
    return out


class StoryCLI(LightningCLI):
    """LightningCLI with the project's fixed callbacks, resumable checkpoint folders, and the model's
    story format handed to the datamodule (its ViT view size, tokenizer and layout are written once,
    in the model's config); loggers without a ``save_dir`` log under ``trainer.default_root_dir``, and
    a step schedule lasts ``trainer.max_steps``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model", "data.init_args.story_format", compute_fn=story_format_of, apply_on="instantiate")

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        if args is None or isinstance(args, (list, tuple)):
            args = nested_nulls_as_dicts(list(sys.argv[1:] if args is None else args))
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        # the model as the command line gave it, before a resumed checkpoint's hyperparameters are merged over it
        self.model_as_given = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None

    def _warn_settings_replaced(self, config: Namespace) -> None:
        replaced = settings_replaced(getattr(self, "model_as_given", None), config.get("model"))
        if replaced:
            log.warning("resuming from %s: the checkpoint's model settings are used, not the command line's: %s. To change "
                        "them, start a new run from its weights (stage 2: init_from an export) or edit the checkpoint's "
                        "hyper_parameters", config.get("ckpt_path"),
                        "; ".join(f"{name} {given!r} -> {used!r}" for name, (given, used) in replaced.items()))

    def before_instantiate_classes(self) -> None:
        # the parsed config of the current subcommand (the whole config when run=False); the config
        # saved next to the logs is this one, so it shows the filled folders
        config = self.config.get(str(self.subcommand), self.config)
        self._warn_settings_replaced(config)
        fill_logger_dirs(config.trainer)
        fill_schedule_length(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        resumable_checkpoints(trainer)
        guard_checkpoint_loading(trainer)
        return trainer


# interpolations (``${trainer.default_root_dir}/export``) resolve after the command line is merged, so
# ``--trainer.default_root_dir`` moves every folder under it; written absolute, read under the subcommand
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


def cli_main(args: ArgsType = None, run: bool = True) -> StoryCLI:
    return StoryCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [DataHealthCallback(), RNGStateCallback(), NonFiniteGuard()]},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
        run=run,
    )
