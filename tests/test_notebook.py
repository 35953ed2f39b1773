"""The inspection notebook runs headless against a small run and shows pictures."""

import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import NO_PROJECTION, config_command
from tests.test_callbacks import evaluator_dir  # noqa: F401  (fixture)
from tests.test_stage3_generation import exports  # noqa: F401  (fixture)
from tests.test_story_mllm import tokenizer_dir  # noqa: F401  (fixture)
from tools.cli import cli_main


@pytest.mark.notebook
@pytest.mark.slow
def test_inspect_story_notebook_executes_and_shows_images(tiny_world, exports, evaluator_dir, tmp_path):  # noqa: F811
    root = tmp_path / "runs"
    shutil.copytree(exports / "stage1", root / "tiny_stage1" / "export")
    shutil.copytree(exports / "stage2", root / "tiny_stage2" / "export")
    common = [
        *config_command("configs/tiny/generate.yaml")[1:],
        f"--model.init_args.detokenizer_dir={root / 'tiny_stage1' / 'export'}", f"--model.init_args.mllm_dir={root / 'tiny_stage2' / 'export'}",
        f"--model.init_args.output_dir={root / 'tiny_stories'}", f"--model.init_args.evaluator_dir={evaluator_dir}",
        "--model.init_args.generation.steps=3", "--model.init_args.generation.num_inference_steps=2", "--model.init_args.test_steps=2",
        NO_PROJECTION,
        f"--data.init_args.predict_files={tiny_world / 'val.jsonl'}", f"--data.init_args.test_files={tiny_world / 'test.jsonl'}",
        f"--data.init_args.image_root={tiny_world / 'images'}", "--data.init_args.synthetic=null",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli_main(["predict", *common])
    cli_main(["test", *common])
    assert (root / "tiny_stories" / "metrics.json").is_file()

    notebook = nbformat.read("notebooks/inspect_story.ipynb", as_version=4)
    os.environ["STORY_RUN_ROOT"], os.environ["STORY_DATA"] = str(root), str(tiny_world)
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": os.getcwd()}}).execute()
    finally:
        del os.environ["STORY_RUN_ROOT"], os.environ["STORY_DATA"]
    images = [cell for cell in notebook.cells if cell.cell_type == "code"
              and any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))]
    assert len(images) >= 5  # data, reconstructions, stories, branches, sink story
    text = "".join(str(out.get("data", {}).get("text/markdown", "")) for cell in notebook.cells for out in cell.get("outputs", []))
    assert "| sink | 25 |" in text and "| metric | value |" in text
