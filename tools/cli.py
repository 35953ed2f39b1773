"""The project's LightningCLI: what ``python train.py {fit,validate,test,predict} --config FILE`` runs.

A LightningCLI in subclass mode: the YAML names the LightningModule and DataModule classes
(``model.class_path``, ``data.class_path``), so one entry serves all three stages. The merged
config is saved next to the run's logs, and everything is seeded (``seed_everything``).
Checkpoints without an explicit ``dirpath`` go to ``<default_root_dir>/checkpoints`` with a
``last.ckpt``, so ``python train.py fit --config X --ckpt_path last`` resumes an interrupted run.
The tools (``python -m tools.consolidate``, ``python -m tools.plan_memory``) build modules from
the same configs through :func:`cli_main`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI

from callbacks.data_health import DataHealthCallback
from callbacks.resilience import NonFiniteGuard, RNGStateCallback, resumable_checkpoints


def story_format_of(model: Any) -> Any:
    """The model's :class:`~datamodules.story_format.StoryFormat` (None for models without one)."""
    return getattr(model, "story_format", None)


class StoryCLI(LightningCLI):
    """LightningCLI with the project's fixed callbacks, resumable checkpoint folders, and the model's
    story format handed to the datamodule (its ViT view size, tokenizer and layout are written once,
    in the model's config)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model", "data.init_args.story_format", compute_fn=story_format_of, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        resumable_checkpoints(trainer)
        return trainer


def cli_main(args: ArgsType = None, run: bool = True) -> StoryCLI:
    return StoryCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [DataHealthCallback(), RNGStateCallback(), NonFiniteGuard()]},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
    )
