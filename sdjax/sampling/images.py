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


HEADER = 28  # pixels above the first row, for the column labels


def column_lefts(column_labels: Sequence[str], cell_width: int) -> tuple:
    """-> (width of the row-label margin, left edge of each column's cell) in a labelled grid.
    A column is widened, its cell centred, when its label is wider than the images."""
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font()
    margin = max(160, cell_width)
    lefts, x = [], margin
    for label in column_labels:
        width = max(cell_width, int(draw.textlength(label, font=font)) + 12)
        lefts.append((x, x + (width - cell_width) // 2))
        x += width
    return x, lefts


def labelled_grid(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str],
                  column_labels: Sequence[str]) -> Image.Image:
    """cells[r][c] in a table with the row labels (prompts) on the left and the column labels
    (checkpoints) on top; cell (r, c) is at (column_lefts(...)[1][c][1], HEADER + r * height),
    pixels unchanged."""
    w, h = cells[0][0].size
    total_width, lefts = column_lefts(column_labels, w)
    margin = lefts[0][0]
    sheet = Image.new("RGB", (total_width, HEADER + len(row_labels) * h), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for (column_left, _), label in zip(lefts, column_labels):
        draw.text((column_left + 6, 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.multiline_text((4, HEADER + r * h + 4), _wrap(draw, label, font, margin - 8),
                            fill="black", font=font)
        for (_, cell_left), image in zip(lefts, cells[r]):
            sheet.paste(image, (cell_left, HEADER + r * h))
    return sheet
