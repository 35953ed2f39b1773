"""The DataModule inside a real Trainer: bad data never stops training; DDP ranks split stories."""

import json

import lightning as L
import pytest

from callbacks.data_health import DataHealthCallback
from datamodules.storystream import StoryStreamDataModule
from tests.conftest import data_args
from tests.helpers import PixelMeanProbe
from tests.test_storystream import bad_world  # noqa: F401  (fixture)


def test_training_runs_through_bad_records_and_logs_skips(bad_world, tmp_path):  # noqa: F811
    path, root = bad_world
    L.seed_everything(0)
    dm = StoryStreamDataModule(train_files=str(path), image_root=str(root), vit_image_size=16, image_size=16,
                               batch_size=2, num_workers=2)
    model = PixelMeanProbe()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[DataHealthCallback()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 3 and len(model.losses) > 0
    metrics = trainer.callback_metrics
    assert metrics["data/skipped_unreadable_image"] == 1  # per epoch: counted again each time it is met
    assert metrics["data/skipped_malformed_json"] == 1
    per_epoch = len(model.losses) // 3  # the last epoch's mean loss, not one batch's, against the first's
    assert sum(model.losses[-per_epoch:]) < sum(model.losses[:per_epoch])


@pytest.mark.distributed
def test_ddp_two_ranks_two_workers_see_each_story_once_per_epoch(tiny_world, tmp_path):
    dm = StoryStreamDataModule(**data_args(tiny_world, batch_size=2, num_workers=2))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(PixelMeanProbe(record_dir=str(tmp_path)), datamodule=dm)
    for epoch in range(2):
        ranks = [json.loads((tmp_path / f"epoch{epoch}_rank{r}.json").read_text()) for r in range(2)]
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == sorted(str(i) for i in range(16))
