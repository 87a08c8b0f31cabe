"""Contact sheets: titled columns of square cells, one captioned row per item (the evaluation's
worst and best images, bulk masking's least confident masks). Pillow and NumPy only; the sheet's
pixel size depends only on its columns, rows and cell side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from basnet.transforms import resize_image

__all__ = ["fit", "compose", "sheet_size"]

GAP = 4
HEADER = 20  # column titles
CAPTION = 16  # one line under each row
EMPTY = 40  # the grey around a fitted picture, and of a cell without one


def sheet_size(columns: int, rows: int, tile: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a sheet of ``columns`` x ``rows`` cells of side ``tile``."""
    return columns * tile + (columns + 1) * GAP, HEADER + rows * (tile + CAPTION + GAP)


def fit(array: np.ndarray, tile: int) -> np.ndarray:
    """A uint8 RGB or grey array scaled to fit a ``tile`` x ``tile`` RGB cell, centred on dark grey
    (bilinear when shrinking, nearest when enlarging: small images keep their real pixels visible)."""
    rgb = array if array.ndim == 3 else np.repeat(array[:, :, None], 3, axis=2)
    height, width = rgb.shape[:2]
    scale = tile / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if scale > 1:
        scaled = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.NEAREST))
    else:
        scaled = resize_image(rgb, size)
    cell = np.full((tile, tile, 3), EMPTY, np.uint8)
    top, left = (tile - size[0]) // 2, (tile - size[1]) // 2
    cell[top:top + size[0], left:left + size[1]] = scaled
    return cell


def compose(titles: Sequence[str], rows: Sequence[tuple[Sequence[np.ndarray | None], str]], tile: int) -> np.ndarray:
    """The sheet as a uint8 RGB array of :func:`sheet_size`: ``titles`` over the columns, then per row
    its pictures (each :func:`fit` into its cell; None leaves the cell plain grey) and its caption."""
    width, height = sheet_size(len(titles), len(rows), tile)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((GAP + c * (tile + GAP), 4), title, fill=(0, 0, 0), font=font)
    blank = np.full((tile, tile, 3), EMPTY, np.uint8)
    for r, (pictures, caption) in enumerate(rows):
        top = HEADER + r * (tile + CAPTION + GAP)
        for c, picture in enumerate(pictures):
            cell = blank if picture is None else fit(picture, tile)
            canvas.paste(Image.fromarray(cell), (GAP + c * (tile + GAP), top))
        draw.text((GAP, top + tile + 2), caption, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
