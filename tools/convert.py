"""Convert released SEED-Story checkpoints into this project's export formats.

    python -m tools.convert agent --release pretrained/SEED-Story/Agent_7B_George/pytorch_model.bin \\
        --tokenizer pretrained/SEED-Story/cvlm_llama2_tokenizer \\
        --config configs/seed_story/data.yaml --config configs/seed_story/stage2_mllm.yaml \\
        --out runs/seed_story_stage2/export
    python -m tools.convert detokenizer --release pretrained/SEED-Story/detokenizer_george/pytorch_model.bin \\
        --config configs/seed_story/data.yaml --config configs/seed_story/stage1_detokenizer.yaml \\
        --out runs/seed_story_stage1/export

``agent``: a released agent ``pytorch_model.bin`` (SEED-Story-George, or SEED-X-pretrained, where
SEED-Story's stage 2 starts): the stage-2 module the configs describe is built over Llama-2-7b
from its ``llm.path``, the LoRA, norms, embeddings, head and resamplers of the file take their
places (:mod:`lightning_modules.components.released_agent`: vocabulary rows matched to the
released tokenizer by string), and the stage-2 export is written: what stage 3, generation and
``init_from`` read.

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

import torch

from datamodules.exports import prefixed
from lightning_modules.components.released_agent import load_released_agent, vocabulary_rows
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


def convert_agent(release: str | Path, tokenizer: str | Path, configs: list[str], out: str | Path,
                  overrides: list[str] | None = None) -> Path:
    """The stage-2 export of a released agent over the Llama base the configs name."""
    from transformers import AutoTokenizer

    state = read_release(release)
    if not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"{tokenizer} is not a folder: point --tokenizer at the released cvlm_llama2_tokenizer")
    module = build_module(configs, overrides or [])
    if not hasattr(module, "story_format") or not hasattr(module, "input_resampler"):
        raise ValueError(f"{configs} do not describe the stage-2 MLLM: use configs/seed_story/stage2_mllm.yaml")
    released_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    rows = vocabulary_rows(module.story_format.tokenizer, released_tokenizer, str(tokenizer), module.num_queries)
    load_released_agent(module, state, rows, str(release))
    path = module.export(out)
    log.info("converted %s (%d tensors; vocabulary matched by string to %s) -> %s", release, len(state), tokenizer, path)
    return Path(path)


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
    common = argparse.ArgumentParser(add_help=False)  # what every converter takes
    common.add_argument("--release", required=True, help="the released pytorch_model.bin")
    common.add_argument("--config", action="append", required=True, help="the stage's configs (in order), e.g. configs/seed_story/...")
    common.add_argument("--out", required=True, help="export folder to write")
    sub = parser.add_subparsers(dest="what", required=True)
    agent = sub.add_parser("agent", parents=[common], help="a released agent pytorch_model.bin -> a stage-2 export")
    agent.add_argument("--tokenizer", required=True, help="the released tokenizer folder (cvlm_llama2_tokenizer)")
    sub.add_parser("detokenizer", parents=[common], help="a released de-tokenizer pytorch_model.bin -> a stage-1 export")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.what == "agent":
        path = convert_agent(args.release, args.tokenizer, args.config, args.out, overrides)
    else:
        path = convert_detokenizer(args.release, args.config, args.out, overrides)
    print(f"export written to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
