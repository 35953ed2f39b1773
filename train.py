"""Entry point for every stage: ``python train.py {fit,validate,test,predict} --config FILE``.

A LightningCLI in subclass mode: the YAML names the LightningModule and DataModule classes
(``model.class_path``, ``data.class_path``), so one entry serves all three stages. The merged
config is saved next to the run's logs, and everything is seeded (``seed_everything``).
Checkpoints without an explicit ``dirpath`` go to ``<default_root_dir>/checkpoints`` with a
``last.ckpt``, so ``python train.py fit --config X --ckpt_path last`` resumes an interrupted run.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI

from callbacks.data_health import DataHealthCallback
from callbacks.resilience import NonFiniteGuard, RNGStateCallback, resumable_checkpoints


class StoryCLI(LightningCLI):
    """LightningCLI with the project's fixed callbacks and resumable checkpoint folders."""

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


if __name__ == "__main__":
    cli_main()
