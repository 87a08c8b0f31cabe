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
from PIL import Image

from basnet import storage
from basnet.imaging import encode_png, sheet
from basnet.imaging.decode import ImageDecodeError, open_image, oriented
from basnet.infer.manifest import WRITTEN

logger = logging.getLogger(__name__)

__all__ = ["QualityReview", "REVIEW_DIR", "SHEET", "LISTING", "TILE"]

REVIEW_DIR = "_review"
SHEET, LISTING = "least_confident.png", "least_confident.csv"
TILE = 160  # side of one cell of the sheet (basnet.imaging.sheet lays it out)
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
        written = np.flatnonzero((status == WRITTEN) & ~np.isnan(confidence))
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


def _photo(uri: str, max_pixels: int | None) -> Image.Image | None:
    """The image at ``uri``, as shown (EXIF applied), a JPEG decoded at the DCT scale nearest above a
    cell; None when it cannot be read (a tar shard's member, ``shard#name``, is not shown)."""
    try:
        img = open_image(storage.read_bytes(uri), max_pixels)
        img.draft("RGB", (TILE, TILE))
        return oriented(img).convert("RGB")
    except (ImageDecodeError, OSError, ValueError) as exc:
        logger.warning("review sheet: cannot show %s: %s", uri, exc)
        return None


def _alpha(uri: str) -> Image.Image | None:
    """The mask as a greyscale image (an RGBA output's alpha), or None."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
            img.load()
            return img.getchannel("A") if img.mode in ("RGBA", "LA") else img.convert("L")
    except (OSError, ValueError) as exc:
        logger.warning("review sheet: cannot show %s: %s", uri, exc)
        return None


def _sheet_row(row: dict, max_pixels: int | None) -> tuple[list[np.ndarray | None], str]:
    """The image, the mask and the cut-out over grey (at the reduced photo's size), and the caption."""
    photo, mask = _photo(row["input"], max_pixels), _alpha(row["output"])
    flag = "  no object" if row["no_object"] else ""
    caption = f"{row['confidence']:.3f}{flag}  {row['input'].rsplit('/', 1)[-1][-40:]}"
    if photo is None or mask is None:
        return [None if photo is None else np.asarray(photo), None if mask is None else np.asarray(mask), None], caption
    mask = mask.resize(photo.size, Image.Resampling.BILINEAR)
    cut = Image.composite(photo, Image.new("RGB", photo.size, (_BACKDROP,) * 3), mask)
    return [np.asarray(photo), np.asarray(mask), np.asarray(cut)], caption


def _sheet(rows: list[dict], max_pixels: int | None) -> bytes:
    return encode_png(sheet.compose(_COLUMNS, [_sheet_row(row, max_pixels) for row in rows], TILE))
