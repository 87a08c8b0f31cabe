"""Discovery of image/mask pairs in a DUTS-layout dataset, local or on S3.

Accepted layouts under a root URI:

* ``DUTS-TR/DUTS-TR-Image`` + ``DUTS-TR/DUTS-TR-Mask`` (training) and optionally
  ``DUTS-TE/DUTS-TE-Image`` + ``DUTS-TE/DUTS-TE-Mask`` (validation and evaluation);
* the root being ``DUTS-TR`` (or ``DUTS-TE``) itself, holding the ``-Image``/``-Mask`` folders;
* a generic ``images/`` + ``masks/`` pair of folders.

An image pairs with the mask at the same relative path, suffix aside (``a/b.jpg`` with
``a/b.png``), so nested folders work. All I/O goes through :mod:`basnet.storage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from basnet import storage
from basnet.data.sample import ensure_sample
from basnet.errors import DataError
from basnet.imaging import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

DUTS_URL = "http://saliencydetection.net/duts/"

# (image folder, mask folder) relative to the root, in order of preference.
_LAYOUTS = {
    "train": (
        ("DUTS-TR/DUTS-TR-Image", "DUTS-TR/DUTS-TR-Mask"),
        ("DUTS-TR-Image", "DUTS-TR-Mask"),
        ("images", "masks"),
    ),
    "test": (
        ("DUTS-TE/DUTS-TE-Image", "DUTS-TE/DUTS-TE-Mask"),
        ("DUTS-TE-Image", "DUTS-TE-Mask"),
    ),
}


@dataclass(frozen=True)
class Pair:
    """One training or evaluation example: the URIs of an image and of its mask."""

    image: str
    mask: str


@dataclass(frozen=True)
class Split:
    """Training and validation pairs found under a root.

    Attributes:
        train: Training pairs, sorted by image URI.
        val: Validation pairs, sorted by image URI.
        val_source: Where ``val`` came from: ``"DUTS-TE"``, ``"held-out 10%"`` or ``"none"``.
        skipped: URIs of unpaired files left out (only with ``skip_unpaired``).
    """

    train: list[Pair]
    val: list[Pair]
    val_source: str
    skipped: list[str] = field(default_factory=list)


def find_split_dirs(root: str, split: str) -> tuple[str, str] | None:
    """Locate the image and mask folders of a split under ``root``.

    Args:
        root: Dataset root URI.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(image_dir, mask_dir)`` URIs, or ``None`` when the root has no such folders.
    """
    if split not in _LAYOUTS:
        raise ValueError(f"split must be one of {sorted(_LAYOUTS)}, got {split!r}")
    for image_rel, mask_rel in _LAYOUTS[split]:
        image_dir, mask_dir = storage.join(root, image_rel), storage.join(root, mask_rel)
        if storage.exists(image_dir) and storage.exists(mask_dir):
            return image_dir, mask_dir
    return None


def images_by_key(directory: str, what: str = "image") -> dict[str, str]:
    """Relative path without suffix -> URI, for every image file under ``directory``.

    Raises:
        DataError: Two files differ only by suffix (``a.jpg`` and ``a.png``): pairing would be ambiguous.
    """
    keyed: dict[str, str] = {}
    for uri in storage.list_files(directory, suffixes=IMAGE_SUFFIXES):
        key = storage.relative_to(uri, directory).rsplit(".", 1)[0]
        if key in keyed:
            raise DataError(f"{keyed[key]} and {uri} have the same name ({what} {key!r}); keep one of them so "
                            "pairing is unambiguous")
        keyed[key] = uri
    return keyed


def pair_files(
    image_dir: str, mask_dir: str, *, skip_unpaired: bool = False
) -> tuple[list[Pair], list[str]]:
    """Pair images with masks by relative path without suffix.

    Args:
        image_dir: Folder (or S3 prefix) of images, searched recursively.
        mask_dir: Folder of masks, searched recursively.
        skip_unpaired: Leave unpaired files out (logging a warning) instead of failing.

    Returns:
        ``(pairs sorted by image URI, unpaired file URIs)``.

    Raises:
        DataError: No images, or unpaired files without ``skip_unpaired``.
    """
    images, masks = images_by_key(image_dir, "image"), images_by_key(mask_dir, "mask")
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {image_dir}; check the path")
    lone_images = sorted(images[k] for k in images.keys() - masks.keys())
    lone_masks = sorted(masks[k] for k in masks.keys() - images.keys())
    unpaired = lone_images + lone_masks
    if unpaired:
        counts = f"{len(lone_images)} images have no mask and {len(lone_masks)} masks have no image"
        where = storage.common_prefix([image_dir, mask_dir])
        if not skip_unpaired:
            raise DataError(
                f"{counts} under {where} (first: {unpaired[0]}); fix the data or pass --skip-unpaired"
            )
        logger.warning("%s under %s; skipping them (first: %s)", counts, where, unpaired[0])
    pairs = sorted(
        (Pair(image=images[k], mask=masks[k]) for k in images.keys() & masks.keys()),
        key=lambda p: p.image,
    )
    if not pairs:
        raise DataError(f"no image under {image_dir} has a mask under {mask_dir}; check the names")
    return pairs, unpaired


def hold_out(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split pairs deterministically into (train, held-out), both sorted by image URI.

    The draw depends only on the sorted pairs and ``seed``, so training and a later evaluation
    on the same root agree on which pairs were held out.

    Args:
        pairs: All pairs.
        fraction: Share held out, in [0, 1); when above 0 at least one pair is held out.
        seed: Seed of the permutation.

    Returns:
        ``(train, held_out)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    ordered = sorted(pairs, key=lambda p: p.image)
    n_val = max(1, round(len(ordered) * fraction)) if fraction > 0 else 0
    if n_val and len(ordered) - n_val < 1:
        raise DataError(
            f"only {len(ordered)} pair(s): too few to hold out a validation set; "
            "add data or a DUTS-TE folder"
        )
    chosen = set(np.random.default_rng(seed).permutation(len(ordered))[:n_val].tolist())
    train = [p for i, p in enumerate(ordered) if i not in chosen]
    val = [p for i, p in enumerate(ordered) if i in chosen]
    return train, val


def _require_train_dirs(root: str) -> tuple[str, str]:
    dirs = find_split_dirs(root, "train")
    if dirs is not None:
        return dirs
    if not storage.exists(root):
        raise DataError(f"{root} does not exist; pass --data with the folder that holds DUTS-TR")
    raise DataError(
        f"no DUTS-TR/DUTS-TR-Image and DUTS-TR-Mask folders (nor images/ and masks/) under {root}; "
        f"pass --data with the folder that holds DUTS-TR (download: {DUTS_URL})"
    )


def discover(
    root: str, *, skip_unpaired: bool = False, val_fraction: float = 0.1, seed: int = 0
) -> Split:
    """Find training and validation pairs under a dataset root.

    Validation comes from DUTS-TE when the root has it, else from a deterministic held-out
    ``val_fraction`` of the training pairs (at least one pair; none when the fraction is 0).

    Args:
        root: Dataset root URI (local path, ``file://`` or ``s3://``).
        skip_unpaired: Leave unpaired files out instead of failing.
        val_fraction: Share of training pairs held out when there is no DUTS-TE.
        seed: Seed of the held-out draw.

    Returns:
        The :class:`Split`.

    Raises:
        DataError: Missing or empty root, unpaired files, too few pairs.
    """
    train_dirs = _require_train_dirs(root)
    train, skipped = pair_files(*train_dirs, skip_unpaired=skip_unpaired)
    test_dirs = find_split_dirs(root, "test")
    if test_dirs is not None:
        val, test_skipped = pair_files(*test_dirs, skip_unpaired=skip_unpaired)
        split = Split(train, val, "DUTS-TE", skipped + test_skipped)
    else:
        train, val = hold_out(train, val_fraction, seed)
        source = f"held-out {val_fraction:.0%}" if val else "none"
        split = Split(train, val, source, skipped)
    logger.info("found %d training and %d validation pairs (%s) under %s",
                len(split.train), len(split.val), split.val_source, root)
    return split


def evaluation_pairs(
    root: str, *, skip_unpaired: bool = False, val_fraction: float = 0.1, seed: int = 0
) -> list[Pair]:
    """The pairs an evaluation of ``root`` should score.

    DUTS-TE when present; else every pair of a generic ``images/`` + ``masks/`` root; else the
    pairs :func:`discover` holds out with the same ``val_fraction`` and ``seed``.

    Args:
        root: Dataset root URI.
        skip_unpaired: Leave unpaired files out instead of failing.
        val_fraction: As in :func:`discover` (only used for the held-out case).
        seed: As in :func:`discover`.

    Returns:
        Pairs sorted by image URI.

    Raises:
        DataError: Nothing to evaluate under ``root``.
    """
    test_dirs = find_split_dirs(root, "test")
    if test_dirs is not None:
        return pair_files(*test_dirs, skip_unpaired=skip_unpaired)[0]
    generic = storage.join(root, "images"), storage.join(root, "masks")
    if storage.exists(generic[0]) and storage.exists(generic[1]):
        return pair_files(*generic, skip_unpaired=skip_unpaired)[0]
    split = discover(root, skip_unpaired=skip_unpaired, val_fraction=val_fraction, seed=seed)
    if not split.val:
        raise DataError(f"nothing to evaluate under {root}: no DUTS-TE folder and no held-out pairs")
    return split.val


def training_split(data: str | None, *, skip_unpaired: bool = False, val_fraction: float = 0.1,
                   seed: int = 0) -> Split:
    """:func:`discover` on ``data``, or on the embedded sample (generated once) when ``data`` is None."""
    root = data if data is not None else ensure_sample()
    return discover(root, skip_unpaired=skip_unpaired, val_fraction=val_fraction, seed=seed)
