"""Reports, at the end of every epoch, how many inputs the data pipeline skipped and why."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class DataHealthCallback(L.Callback):
    """Logs ``data/skipped_<kind>`` (summed over ranks) and a one-line summary per epoch.

    It reads ``trainer.datamodule.skip_report()``; with any other datamodule it does nothing.
    """

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "skip_report"):
            return
        report = datamodule.skip_report(reset=True)
        if report and trainer.is_global_zero:
            log.warning("%s epoch %d: skipped inputs by kind (this rank): %s", stage, trainer.current_epoch, report)
        for kind, count in report.items():
            pl_module.log(f"data/skipped_{kind}", float(count), reduce_fx="sum", sync_dist=True, on_epoch=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train")
