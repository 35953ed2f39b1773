"""The one export format of every stage: a versioned ``export.json`` + safetensors + standard folders.

An export folder is what the next stage (or generation) starts from, and what
``python -m tools.consolidate`` writes from a checkpoint. Every stage writes it through
:func:`writing_export` and reads it through :func:`read_export` / :func:`load_tensors`:

- ``export.json``: ``{"format": "seed-story-lightning", "version": 2, "kind": ..., "config": {...}}``,
  everything but weights needed to rebuild the classes that wrote it;
- named safetensors files of the parts this project defines (adapters, resamplers, heads);
- standard folders of library models as their libraries save them (a diffusers ``unet/``, a
  transformers ``llm/`` or peft ``llm_adapter/``, a ``tokenizer/``).

The folder is written under a temporary name beside its destination and renamed into place only
when complete, so a crash or a full disk while exporting leaves the previous export whole.

It sits in the bottom package because every layer reads exports (the metrics read the evaluator's).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

EXPORT_FILE = "export.json"
FORMAT_NAME = "seed-story-lightning"
FORMAT_VERSION = 2


@contextlib.contextmanager
def writing_export(directory: str | Path, kind: str, config: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary folder to write the export's files into; on success, it replaces ``directory``."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "config": config}
        (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=2, default=str))
        swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_export(directory: str | Path, kind: str) -> dict[str, Any]:
    """The ``config`` of an export of ``kind``; a missing or foreign folder fails naming the file and the fix."""
    path = Path(directory) / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at an export folder written by the {kind} stage "
                                f"(its export_dir, or `python -m tools.consolidate` from a checkpoint)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a version-{FORMAT_VERSION} export of this project "
                         f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}); export it again")
    if manifest.get("kind") != kind:
        raise ValueError(f"{path} is a {manifest.get('kind')!r} export, not a {kind!r} one: check the path")
    return manifest["config"]


def save_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """``name`` as safetensors in ``folder`` (fp32 on CPU, contiguous)."""
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(folder / name))


def load_tensors(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the export folder {directory}: export it again")
    return load_file(str(path))


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix.``, with the prefix removed."""
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


def swap_into_place(partial: Path, final: Path) -> None:
    """Replace ``final`` (file or folder) by ``partial`` with renames: no moment without a whole copy."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        remove_path(old)
    if final.exists() or final.is_symlink():
        final.rename(old)
    partial.rename(final)
    if old.exists() or old.is_symlink():
        remove_path(old)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
