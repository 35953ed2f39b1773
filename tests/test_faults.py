"""Damaged checkpoints and exports fail naming the file and what to do; a failed export keeps the old one."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.resilience import DamagedCheckpointError, guard_checkpoint_loading
from datamodules import exports
from lightning_modules.detokenizer import load_detokenizer
from tests.test_detokenizer import small_module
from tools.consolidate import read_checkpoint

# -- checkpoints ------------------------------------------------------------------------------


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(root: Path, max_steps: int) -> L.Trainer:
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=2,
                                                      save_top_k=-1)
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[checkpoints],
                        enable_progress_bar=False, enable_model_summary=False)
    guard_checkpoint_loading(trainer)
    return trainer


@pytest.fixture()
def run_with_checkpoints(tmp_path):
    _trainer(tmp_path, 4).fit(_Regression())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(list(last.parent.glob("*.ckpt"))) >= 3
    return tmp_path, last


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite_start(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:64] = b"\x00" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _overwrite_start], ids=["truncated", "overwritten"])
def test_a_damaged_last_checkpoint_fails_naming_it_and_an_earlier_one(run_with_checkpoints, damage):
    root, last = run_with_checkpoints
    damage(last)
    with pytest.raises(DamagedCheckpointError) as err:
        _trainer(root, 6).fit(_Regression(), ckpt_path=str(last))
    message = str(err.value)
    assert str(last) in message and "--ckpt_path" in message
    earlier = message.split("--ckpt_path ")[1].split(" ")[0]
    assert Path(earlier).is_file() and Path(earlier) != last
    _trainer(root, 6).fit(_Regression(), ckpt_path=earlier)  # and the earlier one it names resumes


def test_a_damaged_checkpoint_is_named_by_consolidate_too(run_with_checkpoints):
    _, last = run_with_checkpoints
    _truncate(last)
    with pytest.raises(DamagedCheckpointError, match=str(last)):
        read_checkpoint(last)


# -- exports ----------------------------------------------------------------------------------


@pytest.fixture()
def exported(tmp_path):
    module = small_module().eval()
    module.save_detokenizer(tmp_path / "export")
    return module, tmp_path / "export"


def _adapter_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.adapter.state_dict().values(), b.adapter.state_dict().values()))


def test_an_export_that_fails_halfway_leaves_the_previous_one_whole(exported, monkeypatch):
    module, folder = exported
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with torch.no_grad():
        for p in module.adapter.parameters():
            p.add_(1.0)

    def full_disk(tensors, filename, *args, **kwargs):  # writes half a file, then the disk is full
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(exports, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        module.save_detokenizer(folder)
    monkeypatch.undo()
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # byte for byte
    assert sorted(p.name for p in folder.parent.iterdir()) == ["export"]  # no partial folder left behind
    reloaded = load_detokenizer(folder)
    assert not _adapter_equal(reloaded, module)  # the old weights, not the half-written new ones
    assert _adapter_equal(reloaded, load_detokenizer(folder))


def test_a_missing_export_file_is_named(exported):
    _, folder = exported
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet/config\.json is missing from the export folder"):
        load_detokenizer(folder)


def test_a_truncated_export_file_is_named(exported):
    _, folder = exported
    _truncate(folder / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"adapter\.safetensors has \d+ bytes, but was exported with \d+"):
        load_detokenizer(folder)


def test_a_corrupted_tensor_file_is_named(exported):
    _, folder = exported
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: same size, unreadable
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter\.safetensors cannot be read .* export it again"):
        load_detokenizer(folder)


def test_a_damaged_manifest_is_named(exported):
    _, folder = exported
    manifest = folder / exports.EXPORT_FILE
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match=r"export\.json is not readable JSON"):
        load_detokenizer(folder)


def test_a_crash_between_the_two_renames_points_at_the_whole_previous_export(exported):
    _, folder = exported
    folder.rename(folder.with_name("export.old"))  # what a crash right after the first rename leaves
    with pytest.raises(FileNotFoundError, match=r"previous export is whole at .*export\.old"):
        load_detokenizer(folder)


def test_the_manifest_lists_every_file_with_its_size(exported):
    _, folder = exported
    files = json.loads((folder / exports.EXPORT_FILE).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    assert files == {k: v for k, v in on_disk.items() if k != exports.EXPORT_FILE}
    assert "adapter.safetensors" in files and "unet/config.json" in files
