"""Turn a training checkpoint (sharded FSDP folder or single file) into the stage's export format.

    python -m tools.consolidate --config configs/tiny/stage2_mllm.yaml \\
        --checkpoint runs/tiny_stage2/checkpoints/last.ckpt --out runs/tiny_stage2/export

The config rebuilds the module exactly as it was trained (pass the same ``--config`` files, and
any overrides after ``--``); the checkpoint's weights are gathered into one full state dict on
CPU, loaded strictly, and the module writes its release format: stage 1 and 3 a diffusers
``unet/`` folder + ``adapter.safetensors`` + ``detokenizer.json``; stage 2 the peft adapter (or
full LLM), resamplers as safetensors and ``mllm.json``; the evaluator a ``save_pretrained``
CLIP. An EMA kept in the checkpoint is what gets exported, as at the end of ``fit``.

Sharded checkpoints are read with ``torch.distributed.checkpoint`` without a process group; the
whole model (not the optimizer) must fit in CPU memory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from callbacks.resilience import CHECKPOINT_READ_ERRORS, DamagedCheckpointError, damaged_checkpoint_message
from tools.cli import cli_main

log = logging.getLogger(__name__)

DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint in every sharded folder
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``{"state_dict": ..., **rest}`` from a Lightning checkpoint file or a sharded (DCP) folder.

    Everything is loaded with ``weights_only=True``: a checkpoint cannot run code.
    """
    path = Path(path)
    try:
        return _read_checkpoint(path)
    except (FileNotFoundError, DamagedCheckpointError):
        raise
    except CHECKPOINT_READ_ERRORS as err:
        raise DamagedCheckpointError(damaged_checkpoint_message(path, err)) from err


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not (path / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{path} is neither a checkpoint file nor a sharded checkpoint folder (no {DCP_METADATA})")
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # allocate the full model tensors from the shard metadata, then let DCP fill them (no process group)
    metadata = FileSystemReader(str(path)).read_metadata()
    state = {
        key.removeprefix("state_dict."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{path} holds no model weights (no 'state_dict.*' entries)")
    load({"state_dict": state}, storage_reader=FileSystemReader(str(path)), no_dist=True)
    extra = path / LIGHTNING_META
    checkpoint = torch.load(extra, map_location="cpu", weights_only=True) if extra.is_file() else {}
    checkpoint["state_dict"] = state
    return checkpoint


def build_module(configs: list[str], overrides: list[str]):
    """The LightningModule the configs describe, built on CPU without a Trainer run."""
    args = [item for config in configs for item in ("--config", config)]
    # a single-device trainer, whatever strategy the configs name: nothing is sharded here
    args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.num_nodes=1",
             "--trainer.logger=false", "--trainer.precision=32-true", *overrides]
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(sys, "argv", sys.argv[:1]):  # args only from here
        cli = cli_main([*args, f"--trainer.default_root_dir={tmp}"], run=False)
    module = cli.model
    module.configure_model()
    return module


def consolidate(configs: list[str], checkpoint: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    module = build_module(configs, overrides or [])
    state = read_checkpoint(checkpoint)
    missing, unexpected = module.load_state_dict(state["state_dict"], strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{checkpoint} does not match the module built from {configs}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Pass the configs the run was trained with."
        )
    module.on_load_checkpoint(state)  # e.g. the EMA weights
    if not hasattr(module, "export"):
        raise TypeError(f"{type(module).__name__} has no export format")
    path = module.export(out)
    log.info("consolidated %s -> %s", checkpoint, path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="the run's config file(s), in order")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt file or a sharded .ckpt folder")
    parser.add_argument("--out", required=True, help="export folder to write")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. --model.init_args.x=y (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = consolidate(args.config, args.checkpoint, args.out, args.overrides)
    print(f"export written to {path}")


if __name__ == "__main__":
    main()
