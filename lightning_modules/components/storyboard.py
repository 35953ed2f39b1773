"""Writing a generated story to disk: frames as PNG, ``story.json`` and a self-contained storyboard."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def storyboard_html(title: str, captions: list[str], images: list[Image.Image | None], given: list[bool], scale: int = 3) -> str:
    """One HTML file with every frame inlined (base64 PNG) next to its caption, in order."""
    cells = []
    for i, (caption, image, is_given) in enumerate(zip(captions, images, given)):
        if image is not None:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            width = image.width * scale
            picture = f'<img src="data:image/png;base64,{data}" width="{width}" style="image-rendering: pixelated">'
        else:
            picture = "<div class='none'>(no image)</div>"
        tag = "given" if is_given else "generated"
        cells.append(f"<div class='step {tag}'>{picture}<p><b>{i}</b> <i>{tag}</i><br>{html.escape(caption)}</p></div>")
    style = (
        "body{font-family:sans-serif;margin:16px} .board{display:flex;flex-wrap:wrap;gap:12px}"
        " .step{width:220px} .given{opacity:.75} .step p{font-size:13px;margin:4px 0}"
    )
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h2>{html.escape(title)}</h2><div class='board'>{''.join(cells)}</div></body></html>")


def write_story(folder: str | Path, title: str, captions: list[str], images: list[torch.Tensor | None],
                given: list[bool], info: dict[str, Any] | None = None) -> Path:
    """Write ``frame_XX.png`` files, ``story.json`` and ``storyboard.html`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = [to_pil(img) if img is not None else None for img in images]
    files = []
    for i, picture in enumerate(pictures):
        if picture is not None:
            name = f"frame_{i:02d}.png"
            picture.save(folder / name)
            files.append(name)
        else:
            files.append(None)
    record = {"title": title, "captions": captions, "frames": files, "given": given, **(info or {})}
    (folder / "story.json").write_text(json.dumps(record, indent=2, default=str))
    (folder / "storyboard.html").write_text(storyboard_html(title, captions, pictures, given))
    return folder
