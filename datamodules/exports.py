"""The one export format of every stage: a versioned ``export.json`` + safetensors + standard folders.

An export folder is what the next stage (or generation) starts from, and what
``python -m tools.consolidate`` writes from a checkpoint. Every stage writes it through
:func:`writing_export` and reads it through :func:`read_export` / :func:`load_tensors`:

- ``export.json``: ``{"format": "seed-story-lightning", "version": 3, "kind": ..., "config": {...},
  "files": {relative path: bytes}}``, everything but weights needed to rebuild the classes that
  wrote it, and the size of every file written, so that a missing or truncated file is named
  when the export is read (version 2, without ``files``, still reads);
- named safetensors files of the parts this project defines (adapters, resamplers, heads);
- standard folders of library models as their libraries save them (a diffusers ``unet/``, a
  transformers ``llm/`` or peft ``llm_adapter/``, a ``tokenizer/``).

The folder is written under a temporary name beside its destination and renamed into place only
when complete, so a crash or a full disk while exporting leaves the previous export whole. A
damaged export fails when read, naming the file and what to do.

It sits in the bottom package because every layer reads exports (the metrics read the evaluator's).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: the same layout without the file list
REEXPORT = "export it again (its stage's export_dir) or `python -m tools.consolidate` it from a checkpoint"


@contextlib.contextmanager
def writing_export(directory: str | Path, kind: str, config: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary folder to write the export's files into; on success, it replaces ``directory``."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "config": config, "files": files}
        (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=2, default=str))
        swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_export(directory: str | Path, kind: str) -> dict[str, Any]:
    """The ``config`` of an export of ``kind``; a missing or foreign folder fails naming the file and the fix."""
    path = Path(directory) / EXPORT_FILE
    if not path.is_file():
        previous = Path(directory).with_name(Path(directory).name + ".old")
        if (previous / EXPORT_FILE).is_file():
            raise FileNotFoundError(f"{path} not found, but the previous export is whole at {previous} (a crash while "
                                    f"replacing it): rename that folder to {Path(directory).name}, or export again")
        raise FileNotFoundError(f"{path} not found: point at an export folder written by the {kind} stage "
                                f"(its export_dir, or `python -m tools.consolidate` from a checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}): the export is damaged; {REEXPORT}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or manifest.get("version") not in READABLE_VERSIONS:
        found = manifest if not isinstance(manifest, dict) else (manifest.get("format"), manifest.get("version"))
        raise ValueError(f"{path} is not an export of this project in a version it reads {READABLE_VERSIONS} "
                         f"(found {found!r}); {REEXPORT}")
    if manifest.get("kind") != kind:
        raise ValueError(f"{path} is a {manifest.get('kind')!r} export, not a {kind!r} one: check the path")
    check_export_files(Path(directory), manifest.get("files", {}))
    return manifest["config"]


def check_export_files(directory: Path, files: dict[str, int]) -> None:
    """Every file the export was written with is there, at the size it was written."""
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the export folder {directory}; {REEXPORT}")
        if path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, but was exported with {size}: it is truncated "
                             f"or was replaced; {REEXPORT}")


def save_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """``name`` as safetensors in ``folder`` (fp32 on CPU, contiguous)."""
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(folder / name))


def load_tensors(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the export folder {directory}; {REEXPORT}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a damaged header or body
        raise ValueError(f"{path} cannot be read ({err}): the file is damaged; {REEXPORT}") from err


def jsonable(value: Any) -> Any:
    """A module's settings (dataclasses, tuples) as plain JSON values for ``export.json``."""
    if dataclasses.is_dataclass(value):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


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
