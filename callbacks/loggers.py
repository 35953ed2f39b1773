"""W&B logging that never blocks: offline unless an API key is configured."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

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
    """

    def __init__(self, project: str = "seed-story-lightning", save_dir: str = "runs", name: str | None = None,
                 offline: bool | None = None, **kwargs: Any):
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
