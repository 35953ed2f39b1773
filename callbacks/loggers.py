"""The run loggers: W&B that never blocks (offline unless an API key is configured) and CSV.

Both write under ``save_dir``, which a config may leave unset: ``StoryCLI`` (tools/cli.py) then
fills it from ``trainer.default_root_dir``, so the shared logging overlay
(``configs/tiny/logging.yaml``) names no folder and every run logs under its own root.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger

log = logging.getLogger(__name__)


def wandb_api_key_available() -> bool:
    """True when W&B could authenticate: ``WANDB_API_KEY`` or a ``~/.netrc`` entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class StoryWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline when no API key is set (or ``WANDB_MODE=offline``).

    Offline runs are written under ``save_dir`` (``<save_dir>/wandb/offline-run-*``) and can be
    uploaded later with ``wandb sync <that folder>``. The step axis is the trainer's global step.
    ``save_dir=None``: the CLI fills it from ``trainer.default_root_dir`` (and an unset ``name``
    with that folder's name); constructed directly, ``runs``.
    """

    def __init__(self, project: str = "seed-story-lightning", save_dir: str | None = None, name: str | None = None,
                 offline: bool | None = None, **kwargs: Any):
        if save_dir is None:
            save_dir = "runs"
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_api_key_available()
        if offline:
            os.environ.setdefault("WANDB_MODE", "offline")
            log.info("W&B runs offline (no API key): `wandb sync %s/wandb/offline-run-*` uploads them later", save_dir)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("settings", None)
        if kwargs["settings"] is None:
            import wandb

            kwargs["settings"] = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        super().__init__(project=project, save_dir=save_dir, name=name, offline=offline, **kwargs)


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` (``<save_dir>/<name>/version_N/metrics.csv``) whose ``save_dir`` a
    config may leave unset: the CLI fills it from ``trainer.default_root_dir``; constructed directly,
    the current folder (the Trainer's own default root)."""

    def __init__(self, save_dir: str | None = None, name: str | None = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir=os.getcwd() if save_dir is None else save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
