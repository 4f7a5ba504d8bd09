"""Sampled arrays to PIL images, and image grids (labelled ones for comparing checkpoints)."""

from __future__ import annotations

from typing import Sequence

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
                  column_labels: Sequence[str]) -> Image.Image:
    """cells[r][c] in a table with the row labels (prompts) on the left and the column labels
    (checkpoints) on top. Cells keep their pixels exactly; a column is widened (the cell
    centred) when its label is wider than the images."""
    w, h = cells[0][0].size
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font()
    label_width = max(160, w)
    row_texts = [_wrap(draw, label, font, label_width - 8) for label in row_labels]
    widths = [max(w, int(draw.textlength(label, font=font)) + 12) for label in column_labels]
    header = 28
    sheet = Image.new("RGB", (label_width + sum(widths), header + len(row_labels) * h), "white")
    draw = ImageDraw.Draw(sheet)
    left = [label_width + sum(widths[:c]) for c in range(len(widths))]
    for c, label in enumerate(column_labels):
        draw.text((left[c] + 6, 6), label, fill="black", font=font)
    for r, text in enumerate(row_texts):
        draw.multiline_text((4, header + r * h + 4), text, fill="black", font=font)
        for c, image in enumerate(cells[r]):
            sheet.paste(image, (left[c] + (widths[c] - w) // 2, header + r * h))
    return sheet
