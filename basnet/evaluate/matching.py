"""Pairing predicted masks with ground truth, by relative path, then by unique file stem.

Predictions and ground-truth masks are paired by relative path without suffix (``a/b.png``
with ``a/b.png`` or ``a/b.jpg``); files left over on either side are then paired by file stem
when the stem is unique on both sides (a flat prediction folder against a nested ground truth).
What still has no partner is counted and listed, never silently dropped.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

from basnet import storage
from basnet.data.discovery import find_split_dirs, images_by_key
from basnet.errors import DataError
from basnet.imaging import IMAGE_SUFFIXES

__all__ = ["EvalPair", "Matching", "match_folders", "resolve_gt", "prepare_folders"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPair:
    """One prediction and its ground truth (and, when known, the input image, for pictures)."""

    key: str
    pred: str
    gt: str
    image: str | None = None


@dataclass
class Matching:
    """The pairs to score and what found no partner.

    Attributes:
        pairs: Pairs sorted by key (the ground truth's relative path without suffix).
        preds_without_gt: Prediction URIs with no ground truth.
        gt_without_pred: Ground-truth URIs with no prediction.
    """

    pairs: list[EvalPair]
    preds_without_gt: list[str] = field(default_factory=list)
    gt_without_pred: list[str] = field(default_factory=list)


def _stem(key: str) -> str:
    return posixpath.basename(key)


def _match_by_stem(preds: dict[str, str], gts: dict[str, str]) -> dict[str, str]:
    """Leftover gt key -> leftover pred key, where the stem is unique on both sides."""
    def unique_stems(keys) -> dict[str, str]:
        by_stem: dict[str, list[str]] = {}
        for key in keys:
            by_stem.setdefault(_stem(key), []).append(key)
        return {stem: found[0] for stem, found in by_stem.items() if len(found) == 1}

    pred_stems, gt_stems = unique_stems(preds), unique_stems(gts)
    return {gt_stems[s]: pred_stems[s] for s in gt_stems.keys() & pred_stems.keys()}


def _require_files(directory: str, flag: str, found: dict[str, str]) -> None:
    if found:
        return
    if not storage.exists(directory):
        raise DataError(f"{flag} {directory} does not exist; check the path")
    raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {flag} {directory}; check the path")


def match_folders(pred_dir: str, gt_dir: str, *, image_dir: str | None = None) -> Matching:
    """Pairs the masks under ``pred_dir`` with those under ``gt_dir``.

    Args:
        pred_dir: Folder (or S3 prefix) of predictions, searched recursively.
        gt_dir: Folder of ground-truth masks, searched recursively.
        image_dir: Folder of the input images, paired with the ground truth the same way
            (optional; only the contact sheets use it).

    Returns:
        The :class:`Matching`.

    Raises:
        DataError: A folder is missing or empty, names collide, or nothing pairs up.
    """
    preds, gts = images_by_key(pred_dir, "prediction"), images_by_key(gt_dir, "ground truth")
    _require_files(pred_dir, "--pred", preds)
    _require_files(gt_dir, "--gt", gts)
    gt_to_pred = {key: key for key in gts.keys() & preds.keys()}
    lone_preds = {k: v for k, v in preds.items() if k not in gt_to_pred}
    lone_gts = {k: v for k, v in gts.items() if k not in gt_to_pred}
    gt_to_pred.update(_match_by_stem(lone_preds, lone_gts))
    images = _image_lookup(image_dir)
    pairs = [EvalPair(key=k, pred=preds[p], gt=gts[k], image=images(k))
             for k, p in sorted(gt_to_pred.items())]
    if not pairs:
        raise DataError(f"none of the {len(preds)} predictions under {pred_dir} has a ground truth under "
                        f"{gt_dir} (example names: {next(iter(preds))!r}, {next(iter(gts))!r}); "
                        "name each prediction after its ground truth")
    used = set(gt_to_pred.values())
    matching = Matching(pairs=pairs, preds_without_gt=sorted(v for k, v in preds.items() if k not in used),
                        gt_without_pred=sorted(v for k, v in gts.items() if k not in gt_to_pred))
    _log_mismatches(matching)
    return matching


def _image_lookup(image_dir: str | None):
    """A function from ground-truth key to image URI (or None), by relative path, then by stem."""
    if image_dir is None or not storage.exists(image_dir):
        return lambda key: None
    images = images_by_key(image_dir, "image")
    by_stem: dict[str, list[str]] = {}
    for key, uri in images.items():
        by_stem.setdefault(_stem(key), []).append(uri)

    def lookup(key: str) -> str | None:
        if key in images:
            return images[key]
        found = by_stem.get(_stem(key), [])
        return found[0] if len(found) == 1 else None

    return lookup


def _log_mismatches(matching: Matching) -> None:
    for what, uris in (("predictions have no ground truth", matching.preds_without_gt),
                       ("ground-truth masks have no prediction", matching.gt_without_pred)):
        if uris:
            logger.warning("%d %s; they are left out and listed in metrics.json (first: %s)",
                           len(uris), what, uris[0])


def resolve_gt(gt: str, images: str | None = None) -> tuple[str, str | None]:
    """The mask folder and image folder meant by ``--gt`` (and ``--images``).

    ``gt`` may be a DUTS-layout root (its DUTS-TE masks are used) or a mask folder; without
    ``images`` the image folder is guessed: ``X-Image`` beside ``X-Mask``, ``images`` beside ``masks``.
    """
    test_dirs = find_split_dirs(gt, "test")
    if test_dirs is not None:
        return test_dirs[1], images or test_dirs[0]
    return gt, images or _guess_image_dir(gt)


def _guess_image_dir(mask_dir: str) -> str | None:
    parent, name = posixpath.split(mask_dir.rstrip("/"))
    if name.endswith("-Mask"):
        image_name = name[: -len("-Mask")] + "-Image"
    elif name == "masks":
        image_name = "images"
    else:
        return None
    candidate = storage.join(parent, image_name)
    return candidate if storage.exists(candidate) else None


def prepare_folders(pred: str, gt: str, *, images: str | None = None) -> Matching:
    """Resolves ``--gt``/``--images`` (see :func:`resolve_gt`) and pairs the folders; reads no pixels."""
    gt_dir, image_dir = resolve_gt(gt, images)
    return match_folders(pred, gt_dir, image_dir=image_dir)
