"""Stage 2's ``init_from``: a stage-2 export's trained weights loaded strictly into a freshly built module.

The export layout (:func:`lightning_modules.mllm_export.save_mllm`): ``llm_adapter/`` (peft) or
``llm/`` (a whole LLM), ``tokenizer/``, and the parts around the LLM in :data:`RESAMPLERS_FILE` (:func:`head_parts`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from datamodules.exports import load_tensors, prefixed, read_export
from datamodules.tokenizer import load_story_tokenizer
from lightning_modules.components import story_llm
from lightning_modules.components.story_llm import LLMSpec
from lightning_modules.components.strict_load import load_strictly, state_mismatch

log = logging.getLogger(__name__)

EXPORT_KIND = "mllm"
RESAMPLERS_FILE = "resamplers.safetensors"


def head_parts(module) -> list[str]:
    """The module's parts around the LLM that :data:`RESAMPLERS_FILE` holds, each under its name as key prefix:
    the two resamplers and, where the module has one, the keep-or-code codebook (its codes and head)."""
    return ["input_resampler", "output_resampler"] + (["codebook"] if getattr(module, "codebook", None) is not None else [])


def start_from_export(module, export_dir: str | Path) -> None:
    """Load a stage-2 export's trained weights into a freshly built module (``init_from``)."""
    root = Path(export_dir)
    read_export(root, EXPORT_KIND)  # a wrong folder fails here, naming it
    exported = load_story_tokenizer(root / "tokenizer", module.num_queries).get_vocab()
    if exported != module.story_format.tokenizer.get_vocab():
        raise ValueError(f"init_from {root}: its tokenizer numbers tokens unlike story_format.tokenizer "
                         f"({module.story_format.config.tokenizer}); point story_format.tokenizer at {root / 'tokenizer'}")
    if (root / "llm_adapter").is_dir() != (module.lora is not None):
        raise ValueError(f"init_from {root} holds {'an llm_adapter/' if module.lora is None else 'a whole llm/'}: set `lora:` "
                         "to match (LoRA settings for an adapter, null for a whole LLM)")
    if module.lora is not None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        weights = load_peft_weights(str(root / "llm_adapter"), device="cpu")
        problems = state_mismatch(get_peft_model_state_dict(module.llm), weights)
        if problems:
            raise ValueError(f"init_from {root / 'llm_adapter'} does not fit the LoRA these settings build: " + "; ".join(problems))
        set_peft_model_state_dict(module.llm, weights)
    else:
        trained = story_llm.build_llm(LLMSpec(path=str(root / "llm")))
        load_strictly(module.llm, trained.state_dict(), f"init_from {root / 'llm'}")
    state = load_tensors(root, RESAMPLERS_FILE)
    for name in head_parts(module):
        load_strictly(getattr(module, name), prefixed(state, name), f"init_from {root / RESAMPLERS_FILE} ({name}.*)")
    log.info("stage 2 starts from %s", root)
