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


def story_strip(captions: list[str], images: list[torch.Tensor | Image.Image | None], scale: int = 2,
                columns: int = 10) -> Image.Image:
    """One picture of a story for notebooks: frames in rows of ``columns``, a short caption under each."""
    from PIL import ImageDraw

    pictures = [to_pil(i) if isinstance(i, torch.Tensor) else i for i in images]
    first = next(p for p in pictures if p is not None)
    w, h = first.width * scale, first.height * scale
    text_h = 28
    caption_chars = max(8, w // 6)  # the default bitmap font is about 6 px wide
    rows = (len(pictures) + columns - 1) // columns
    sheet = Image.new("RGB", (w * min(columns, len(pictures)), (h + text_h) * rows), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (caption, picture) in enumerate(zip(captions, pictures)):
        x, y = (i % columns) * w, (i // columns) * (h + text_h)
        if picture is not None:
            sheet.paste(picture.resize((w, h), Image.Resampling.NEAREST), (x, y))
        words = caption[: 2 * caption_chars]
        draw.text((x + 2, y + h + 1), words[:caption_chars], fill=(0, 0, 0))
        draw.text((x + 2, y + h + 13), words[caption_chars:], fill=(0, 0, 0))
    return sheet


def comparison_grid(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(originals, reconstructions) batches in [-1, 1] -> one (3, H, W) grid in [0, 1]: originals on top."""
    from torchvision.utils import make_grid

    target = torch.cat([p[0] for p in pairs])
    recon = torch.cat([p[1] for p in pairs])
    images = torch.cat([target, recon]).float().add(1).div(2).clamp(0, 1)
    return make_grid(images, nrow=target.shape[0], padding=1)
