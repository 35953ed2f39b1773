"""The tiny LLM's pretraining: a causal LM learns the stories' language from their captions alone.

SEED-Story starts stage 2 from Llama 2, a model that already writes; the tiny pipeline's LLM is
built from a config, so without this step it would learn the world's grammar and who is on
screen from stage 2 alone, where each batch holds a few short chunks and most of the compute goes
to images. Here it reads whole stories (``BOS cap_0 [INST] cap_1 ... EOS``, the step openings and
caption ids of stage 2's layout: :meth:`~datamodules.story_format.StoryFormat.encode_text`) from
the data module's ``mode="text"``, which reads no image.

The export's ``llm/`` folder is a Hugging Face model folder with its tokenizer, as a pretrained
LLM is: stage 2 points both ``llm.path`` and ``story_format.tokenizer`` at it
(``configs/tiny/stage2_mllm.yaml``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from datamodules.batch import batch_size
from datamodules.exports import jsonable, writing_export
from datamodules.story_format import StoryFormat, StoryFormatConfig
from lightning_modules.components import sharding, story_llm
from lightning_modules.components.schedules import optimizer_config
from lightning_modules.components.story_llm import LLMSpec

EXPORT_KIND = "language_model"
LLM_FOLDER = "llm"  # the model and its tokenizer, as a Hugging Face folder


class StoryLanguageModelModule(L.LightningModule):
    """Next-token cross-entropy on caption-only stories (``mode="text"``).

    Args:
        llm: the architecture (``config``, random init with ``seed``) or a local folder to go on from.
        story_format: the tokenizer (trained on the train split's captions when absent, as stage 2's
            would be) and the token budget; ``num_queries`` is unused (no images).
        export_dir: where ``llm/`` and ``export.json`` are written at the end of ``fit``.
    """

    def __init__(
        self,
        llm: LLMSpec,
        story_format: StoryFormatConfig | None = None,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.llm_spec = llm
        self.story_format = StoryFormat(story_format or StoryFormatConfig(), vit_image_size=None)
        self.export_dir = export_dir
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.llm: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.llm is not None:
            return
        fmt = self.story_format
        if not fmt.has_tokenizer():
            fmt.prepare([])  # raises, naming the folder and the fix
        # the base vocabulary only: the image tokens are stage 2's, added there
        vocab = fmt.tokenizer.vocab_size if self.llm_spec.path is None else None
        self.llm = story_llm.build_llm(self.llm_spec, vocab_size=vocab)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        n = batch_size(batch)
        if n == 0:
            return None
        sequence = batch["sequence"]
        logits = self.llm(input_ids=sequence.input_ids, attention_mask=sequence.attention_mask).logits
        loss, accuracy = story_llm.next_token_loss(logits, sequence.labels)
        on_step = stage == "train"
        self.log(f"{stage}/lm_loss", loss, batch_size=n, prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 sync_dist=not on_step)
        self.log(f"{stage}/token_acc", accuracy, batch_size=n, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        for name in ("dropped_steps", "truncated_captions"):  # what the token budget cut
            if getattr(sequence, name):
                self.log(f"{stage}/{name}", float(getattr(sequence, name)), batch_size=n, reduce_fx="sum")
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def configure_optimizers(self) -> Any:
        self.configure_model()
        return optimizer_config(self.llm.parameters(), self.optimizer_factory, self.scheduler_factory)

    def on_fit_end(self) -> None:
        sharding.export_at_fit_end(self, self.export_dir)

    def export(self, directory: str | Path) -> Path:
        return save_language_model(self, directory)


def save_language_model(module: StoryLanguageModelModule, out_dir: str | Path) -> Path:
    """``llm/``: the model (``save_pretrained``) beside a copy of the tokenizer files it was trained with."""
    module.configure_model()
    config = jsonable({k: v for k, v in module.hparams.items() if k != "export_dir"})
    with writing_export(out_dir, EXPORT_KIND, config) as tmp:
        folder = tmp / LLM_FOLDER
        module.llm.save_pretrained(str(folder))
        for file in Path(module.story_format.config.tokenizer).iterdir():  # the base tokenizer, without stage 2's image tokens
            if file.is_file():
                shutil.copy2(file, folder / file.name)
    return Path(out_dir)


def export_untrained(llm: LLMSpec, train_files: list[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """A seeded, untrained export whose tokenizer is trained on ``train_files``' captions; returns its
    ``llm/`` folder. What tests and benches start stage 2 from when they measure anything but language."""
    out_dir = Path(out_dir)
    config = StoryFormatConfig(tokenizer=str(out_dir / "tokenizer"), train_vocab_size=vocab_size)
    module = StoryLanguageModelModule(llm=llm, story_format=config)
    module.story_format.prepare(train_files)
    return save_language_model(module, out_dir / "export") / LLM_FOLDER
