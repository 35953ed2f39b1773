"""Stage 2's export: :func:`save_mllm` writes everything stage 3 and generation need in standard formats,
:func:`load_mllm` rebuilds the frozen module from it, :func:`exported_story_format` reads its story format alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from datamodules.exports import jsonable, load_tensors, prefixed, read_export, save_tensors, writing_export
from datamodules.story_format import StoryFormat, StoryFormatConfig
from lightning_modules.components.feature_codebook import CodebookConfig
from lightning_modules.components.mllm_init import EXPORT_KIND, RESAMPLERS_FILE, head_parts
from lightning_modules.components.resamplers import resampler_config_from_dict
from lightning_modules.components.story_llm import LLMSpec, LoRASpec
from lightning_modules.components.vision_encoder import FrozenVisionEncoder, VisionEncoderConfig
from lightning_modules.story_mllm import StoryMLLMModule


def save_mllm(module: StoryMLLMModule, out_dir: str | Path) -> Path:
    """The export: everything stage 3 and generation need, in standard formats.

    ``llm_adapter/`` (peft ``save_pretrained``, LoRA + the modules trained whole, the new token rows
    among them) or ``llm/`` (a full ``save_pretrained`` when trained without LoRA), ``tokenizer/``,
    the resamplers (and the codebook, where there is one) as safetensors, and the module's settings in ``export.json``.
    """
    module.ensure_built()
    config = jsonable({k: v for k, v in module.hparams.items() if k not in ("export_dir", "fsdp", "init_from")})
    with writing_export(out_dir, EXPORT_KIND, config) as tmp:
        module.llm.save_pretrained(str(tmp / ("llm_adapter" if module.lora is not None else "llm")))
        module.story_format.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        save_tensors(tmp, RESAMPLERS_FILE, {f"{name}.{k}": v for name in head_parts(module)
                                            for k, v in getattr(module, name).state_dict().items()})
    return Path(out_dir)


def _read_export(export_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    return Path(export_dir), read_export(export_dir, EXPORT_KIND)


def _exported_format_config(root: Path, config: dict[str, Any]) -> StoryFormatConfig:
    # the export's own tokenizer folder, never trained again
    return StoryFormatConfig(**{**config["story_format"], "tokenizer": str(root / "tokenizer"), "train_vocab_size": None})


def exported_story_format(export_dir: str | Path) -> StoryFormat:
    """The story format of a stage-2 export, without building the model (what stage 3's data is encoded with)."""
    root, config = _read_export(export_dir)
    vision = FrozenVisionEncoder(VisionEncoderConfig(**config["vision_encoder"]))  # the tower itself is built lazily
    return StoryFormat(_exported_format_config(root, config), vision.image_size)


def load_mllm(export_dir: str | Path, device: str | torch.device = "cpu") -> StoryMLLMModule:
    """Rebuild a trained stage-2 MLLM from :func:`save_mllm`'s folder (frozen, eval mode)."""
    root, config = _read_export(export_dir)
    llm = LLMSpec(**config.pop("llm")) if config.get("llm") else None
    if (root / "llm").is_dir():
        llm = LLMSpec(path=str(root / "llm"))
    module = StoryMLLMModule(
        llm=llm,
        story_format=_exported_format_config(root, config),
        vision_encoder=VisionEncoderConfig(**config.pop("vision_encoder")) if config.get("vision_encoder") else None,
        input_resampler=resampler_config_from_dict(config.pop("input_resampler", None)),
        output_resampler=resampler_config_from_dict(config.pop("output_resampler", None)),
        codebook=CodebookConfig(**config.pop("codebook")) if config.get("codebook") else None,
        lora=None,
        **{k: v for k, v in config.items()
           if k in ("lm_weight", "rec_weight", "rec_loss", "residual_features", "queries_from_previous", "regress_from",
                    "edit_from", "context_blur")},
    )
    module.configure_model()
    if (root / "llm_adapter").is_dir():
        from peft import PeftModel

        module.llm = PeftModel.from_pretrained(module.llm, str(root / "llm_adapter"))
        module.lora = LoRASpec()
    state = load_tensors(root, RESAMPLERS_FILE)
    for name in head_parts(module):
        getattr(module, name).load_state_dict(prefixed(state, name))
    module.requires_grad_(False)
    return module.to(device).eval()
