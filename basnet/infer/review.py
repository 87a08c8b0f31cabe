"""What a bulk run says about its masks' quality: counts, and a contact sheet of the least confident.

The driver sees every manifest row as it streams by. ``QualityReview`` keeps counts and a heap of
the ``--review`` least confident masks (confidence, input, output: a few hundred bytes each), so
its memory is bounded by N, not by the collection. At the end it writes ``<output>/_review/``:

- ``least_confident.png``: one row per mask, least confident first: the image, the mask, the
  cut-out (the image with the mask as alpha, over grey), and a caption (confidence, no_object, name);
- ``least_confident.csv``: the same rows (rank, confidence, no_object, input, output).
"""

from __future__ import annotations

import csv
import heapq
import io
import logging

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from basnet import storage
from basnet.imaging.decode import ImageDecodeError, open_image, oriented

logger = logging.getLogger(__name__)

__all__ = ["QualityReview", "REVIEW_DIR", "SHEET", "LISTING", "TILE"]

REVIEW_DIR = "_review"
SHEET, LISTING = "least_confident.png", "least_confident.csv"
TILE = 160  # side of one cell of the sheet
_GAP, _HEADER, _CAPTION = 4, 20, 16
_COLUMNS = ("image", "mask", "cut-out")
_BACKDROP = 128  # the grey a cut-out is shown over


class QualityReview:
    """Counts of the written masks' quality and the ``keep`` least confident of them.

    Args:
        keep: How many of the least confident masks to keep for the sheet (0: none).
        flag_below: Masks with a confidence under this are counted as flagged.
    """

    def __init__(self, keep: int = 0, flag_below: float = 0.0) -> None:
        self.keep, self.flag_below = keep, flag_below
        self.scored = self.no_object = self.flagged = 0
        self._heap: list[tuple[float, int, str, str, bool]] = []  # (-confidence, order, input, output, no_object)
        self._seen = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Takes a batch of manifest rows (``status``, ``confidence``, ``no_object``, ``input``, ``output``)."""
        if "confidence" not in batch:
            return
        status = np.asarray(batch["status"]).astype(str)
        confidence = np.asarray(batch["confidence"], np.float64)
        written = np.flatnonzero((status == "written") & ~np.isnan(confidence))
        no_object = np.asarray(batch["no_object"], bool)
        self.scored += len(written)
        self.no_object += int(no_object[written].sum())
        self.flagged += int((confidence[written] < self.flag_below).sum())
        if not self.keep:
            return
        for i in written:
            self._seen += 1
            item = (-float(confidence[i]), -self._seen, str(batch["input"][i]), str(batch["output"][i]),
                    bool(no_object[i]))
            if len(self._heap) < self.keep:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:  # less confident than the most confident kept (earlier wins ties)
                heapq.heapreplace(self._heap, item)

    def least_confident(self) -> list[dict]:
        """The kept masks, least confident first (ties: in the order they came)."""
        ordered = sorted(self._heap, key=lambda item: (-item[0], -item[1]))
        return [{"confidence": -c, "input": source, "output": output, "no_object": flag}
                for c, _, source, output, flag in ordered]

    def line(self) -> str:
        """``"quality: 3 of 20 masks show no object; 5 under confidence 0.5"``."""
        if not self.scored:
            return ""
        flagged = f"; {self.flagged} under confidence {self.flag_below:g} (--flag-below)" if self.flag_below else ""
        return f"quality: {self.no_object} of {self.scored} masks show no object{flagged}"

    def write(self, output_root: str, *, max_pixels: int | None = None) -> dict[str, str]:
        """Writes the sheet and its listing under ``<output_root>/_review/``; returns name -> URI
        (nothing when no mask was kept)."""
        rows = self.least_confident()
        if not rows:
            return {}
        folder = storage.join(output_root, REVIEW_DIR)
        listing = io.StringIO()
        table = csv.writer(listing)
        table.writerow(["rank", "confidence", "no_object", "input", "output"])
        for rank, row in enumerate(rows, 1):
            table.writerow([rank, f"{row['confidence']:.4f}", row["no_object"], row["input"], row["output"]])
        files = {SHEET: _sheet(rows, max_pixels), LISTING: listing.getvalue().encode()}
        written = {}
        for name, data in files.items():
            written[name] = storage.join(folder, name)
            storage.write_bytes(written[name], data)
        return written


def _thumbnail(uri: str, mode: str, max_pixels: int | None) -> Image.Image | None:
    """The file at ``uri`` shrunk to fit a cell (a JPEG decoded at a reduced scale), or None."""
    try:
        img = open_image(storage.read_bytes(uri), max_pixels)  # a tar shard's member (shard#name) is not shown
        img.draft("RGB", (TILE, TILE))  # JPEG: the DCT scale nearest above the cell
        img = oriented(img).convert(mode)
    except (ImageDecodeError, OSError, ValueError) as exc:
        logger.warning("review sheet: cannot show %s: %s", uri, exc)
        return None
    return _fit(img)


def _fit(img: Image.Image) -> Image.Image:
    """Shrunk (bilinear) or enlarged (nearest: small images keep their pixels visible) to fit a cell."""
    scale = TILE / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)


def _alpha(uri: str) -> Image.Image | None:
    """The mask as a cell-sized greyscale image (an RGBA output's alpha), or None."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
            img.load()
            alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else img.convert("L")
    except (OSError, ValueError) as exc:
        logger.warning("review sheet: cannot show %s: %s", uri, exc)
        return None
    return _fit(alpha)


def _cells(row: dict, max_pixels: int | None) -> list[Image.Image | None]:
    photo = _thumbnail(row["input"], "RGB", max_pixels)
    mask = _alpha(row["output"])
    if photo is None or mask is None:
        return [photo, mask, None]
    mask = mask.resize(photo.size, Image.Resampling.BILINEAR)
    cut = Image.composite(photo, Image.new("RGB", photo.size, (_BACKDROP,) * 3), mask)
    return [photo, mask.convert("RGB"), cut]


def _sheet(rows: list[dict], max_pixels: int | None) -> bytes:
    width = len(_COLUMNS) * TILE + (len(_COLUMNS) + 1) * _GAP
    height = _HEADER + len(rows) * (TILE + _CAPTION + _GAP)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for c, title in enumerate(_COLUMNS):
        draw.text((_GAP + c * (TILE + _GAP), 4), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        top = _HEADER + r * (TILE + _CAPTION + _GAP)
        for c, cell in enumerate(_cells(row, max_pixels)):
            left = _GAP + c * (TILE + _GAP)
            draw.rectangle((left, top, left + TILE - 1, top + TILE - 1), fill=(40, 40, 40))
            if cell is not None:
                canvas.paste(cell, (left + (TILE - cell.width) // 2, top + (TILE - cell.height) // 2))
        flag = "  no object" if row["no_object"] else ""
        caption = f"{row['confidence']:.3f}{flag}  {row['input'].rsplit('/', 1)[-1][-40:]}"
        draw.text((_GAP, top + TILE + 2), caption, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
