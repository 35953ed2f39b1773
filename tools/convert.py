"""Convert released SEED-Story checkpoints into this project's export formats.

    python -m tools.convert detokenizer --release pretrained/SEED-Story/detokenizer_george/pytorch_model.bin \\
        --config configs/seed_story/data.yaml --config configs/seed_story/stage1_detokenizer.yaml \\
        --out runs/seed_story_stage1/export

``detokenizer``: a released de-tokenizer ``pytorch_model.bin`` (pretrained or George-adapted) holds
``unet.*`` (diffusers SD-XL names, the tensors that training changed, e.g. every attention's
``to_k`` / ``to_v``) and ``resampler.*`` (the released adapter). The module the configs describe
is built with SD-XL base from its ``unet.path``, the ``unet.*`` tensors replace their namesakes,
the adapter (``adapter.layout: seed_story``) takes ``resampler.*``, and the stage-1 export is
written: a diffusers ``unet/`` and ``adapter.safetensors``, what stage 3 and generation start from.

Every tensor of the file must find its place with its shape: a missing, unexpected or misshapen
one stops the conversion with its name. Extra ``--model...`` / ``--trainer...`` arguments after
the configs are passed on (e.g. other paths).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from datamodules.exports import prefixed
from lightning_modules.components.strict_load import load_strictly, state_mismatch
from tools.consolidate import build_module

log = logging.getLogger(__name__)


def read_release(path: str | Path) -> dict[str, torch.Tensor]:
    """A released ``pytorch_model.bin``: a flat dict of tensors (loaded without running code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point --release at the released pytorch_model.bin")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors")
    return state


def convert_detokenizer(release: str | Path, configs: list[str], out: str | Path, overrides: list[str] | None = None) -> Path:
    """The stage-1 export of a released de-tokenizer over the SD-XL base UNet the configs name."""
    state = read_release(release)
    others = sorted(k for k in state if not k.startswith(("unet.", "resampler.")))
    if others:
        raise ValueError(f"{release}: unexpected tensors outside unet.* and resampler.*: {others[:6]}")
    module = build_module(configs, overrides or [])
    if module.adapter_config.layout != "seed_story":
        raise ValueError("the released de-tokenizer needs adapter.layout: seed_story in the config "
                         f"(got {module.adapter_config.layout!r}); use configs/seed_story/stage1_detokenizer.yaml")
    trained = prefixed(state, "unet")
    base = module.unet.state_dict()
    problems = [line for line in state_mismatch(base, trained) if not line.startswith("missing")]  # a subset is expected
    if problems:
        raise ValueError(f"{release}: its unet.* tensors do not fit the SD-XL UNet of {module.unet_spec.path}: " + "; ".join(problems))
    load_strictly(module.unet, {**base, **trained}, f"{release} over {module.unet_spec.path}")
    adapter = {k: v for k, v in state.items() if k.startswith("resampler.")}
    load_strictly(module.adapter, adapter, f"{release} (resampler.*)")
    path = module.export(out)
    log.info("converted %s (%d UNet tensors over SD-XL base, %d adapter tensors) -> %s", release, len(trained), len(adapter), path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    det = sub.add_parser("detokenizer", help="a released de-tokenizer pytorch_model.bin -> a stage-1 export")
    det.add_argument("--release", required=True, help="the released pytorch_model.bin")
    det.add_argument("--config", action="append", required=True, help="the stage-1 configs (in order), e.g. configs/seed_story/...")
    det.add_argument("--out", required=True, help="export folder to write")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO)
    converters: dict[str, Any] = {"detokenizer": convert_detokenizer}
    path = converters[args.what](args.release, args.config, args.out, overrides)
    print(f"export written to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
