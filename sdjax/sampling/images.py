"""Sampled arrays to PIL images, and image grids (labelled ones for comparing checkpoints)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: np.ndarray) -> list:
    """(N, H, W, 3) floats in [0, 1] -> N RGB images (rounded as diffusers rounds)."""
    return [Image.fromarray(x) for x in (np.asarray(images) * 255).round().astype(np.uint8)]


def grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images of one size tiled row by row, `columns` per row."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet


def _font():
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return "\n".join(lines + [line])


def labelled_grid(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
                  column_labels: Sequence[str], label_width: Optional[int] = None,
                  header_height: int = 28) -> Image.Image:
    """cells[r][c] in a table with the row labels (prompts) on the left and the column labels
    (checkpoints) on top. Each cell keeps its pixels exactly."""
    w, h = cells[0][0].size
    label_width = label_width or max(160, w)
    sheet = Image.new("RGB", (label_width + len(column_labels) * w, header_height + len(row_labels) * h),
                      "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for c, label in enumerate(column_labels):
        draw.text((label_width + c * w + 4, 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.multiline_text((4, header_height + r * h + 4), _wrap(draw, label, font, label_width - 8),
                            fill="black", font=font)
        for c, cell in enumerate(cells[r]):
            sheet.paste(cell, (label_width + c * w, header_height + r * h))
    return sheet


def cell(sheet: Image.Image, row: int, column: int, size: tuple, label_width: int,
         header_height: int = 28) -> Image.Image:
    """The image at (row, column) of a `labelled_grid` sheet."""
    w, h = size
    x, y = label_width + column * w, header_height + row * h
    return sheet.crop((x, y, x + w, y + h))
