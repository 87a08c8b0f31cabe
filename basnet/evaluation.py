"""Scoring predicted saliency maps against ground truth, one process, no Ray.

Predictions and ground-truth masks are paired by relative path without suffix (``a/b.png``
with ``a/b.png`` or ``a/b.jpg``); files left over on either side are then paired by file stem
when the stem is unique on both sides (a flat prediction folder against a nested ground truth).
What still has no partner is counted and listed, never silently dropped.

Each pair is scored at the ground truth's original size (DESIGN.md section 5): a prediction of
another size is resized to it bilinearly and counted. Files that cannot be decoded are counted
and skipped. :class:`Scores` holds mergeable partial results, so :mod:`basnet.ray_eval` scores
parts in parallel and merges them into exactly what :func:`score_pairs` gives on the whole.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from basnet import storage
from basnet.config import PRECISIONS, ConfigError, option
from basnet.data import DataError, Pair, evaluation_pairs, find_split_dirs
from basnet.metrics import SODMetrics, image_scores
from basnet.transforms import IMAGE_SUFFIXES, ImageDecodeError, decode_mask, resize_mask

__all__ = ["EvalConfig", "EvalPair", "Matching", "Scores", "Evaluation", "match_folders", "resolve_gt",
           "prepare_folders", "load_pair", "score_pairs", "finish_scores", "evaluate_folders", "common_dir",
           "resolve_eval_data", "plan_weights", "WeightsPlan", "SAMPLE_TOKEN"]

logger = logging.getLogger(__name__)

_PROGRESS_EVERY = 200  # images between progress lines of a single-process run
SAMPLE_TOKEN = "sample"  # --data / --eval-data value meaning the embedded sample's held-out images
_DEFAULT_IMAGE_SIZE = 256  # the paper's test size


@dataclass
class EvalConfig:
    """Options of ``jobs/evaluate.py``: score existing masks, or predict and then score."""

    pred: str | None = option(None, "folder of predicted masks (local, file:// or s3://); use with --gt")
    gt: str | None = option(None, "folder of ground-truth masks, or a DUTS-layout root holding DUTS-TE; "
                                "use with --pred")
    images: str | None = option(None, "folder of the input images, for the contact sheets (default: "
                                    "guessed beside --gt, e.g. DUTS-TE-Image next to DUTS-TE-Mask)")
    weights: str | None = option(None, "checkpoint directory, model.pt or published basnet.pth to predict "
                                     "with; use with --data")
    data: str | None = option(None, "DUTS-layout root, or a root holding images/ and masks/, or 'sample' "
                                  "(the embedded sample's held-out images); use with --weights")
    out: str = option("eval", "where metrics.json, metrics.md, per_image.parquet and the pictures go "
                            "(and predictions/ with --weights)")
    image_size: int | None = option(None, "side the model sees with --weights, a multiple of 32 (default: "
                                        "the checkpoint's training size, else 256)")
    batch_size: int = option(8, "images per inference batch with --weights")
    precision: str = option("auto", "with --weights: auto (bf16 on GPUs that support it, fp16 on older "
                                  "GPUs, fp32 on CPU), fp32, bf16 or fp16", choices=PRECISIONS)
    sheet_rows: int = option(8, "images in each of the worst.png and best.png contact sheets")
    skip_unpaired: bool = option(False, "with --data: skip images without a mask instead of failing")
    blocks: int | None = option(None, "parallel scoring tasks (default: from the cluster's CPUs and the "
                                    "number of images)")
    verbose: bool = option(False, "show Ray's own INFO logs on the console")

    def mode(self) -> str:
        """``"pred"`` or ``"weights"``; raises ConfigError unless exactly one mode is complete."""
        pred_mode = self.pred is not None or self.gt is not None
        weights_mode = self.weights is not None or self.data is not None
        if pred_mode and weights_mode:
            raise ConfigError("--pred/--gt and --weights/--data are two different modes: pass one pair")
        if pred_mode and (self.pred is None or self.gt is None):
            missing = "--gt" if self.gt is None else "--pred"
            raise ConfigError(f"--pred and --gt go together: add {missing}")
        if weights_mode and (self.weights is None or self.data is None):
            missing = "--data" if self.data is None else "--weights"
            raise ConfigError(f"--weights and --data go together: add {missing}")
        if not pred_mode and not weights_mode:
            raise ConfigError("nothing to evaluate: pass --pred DIR --gt DIR, or --weights SOURCE --data DIR")
        self.check()
        return "pred" if pred_mode else "weights"

    def check(self) -> None:
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise ConfigError(f"--image-size {self.image_size} is not a multiple of 32 (>= 32): "
                              "BASNet downsamples by 32")
        for key in ("batch_size", "sheet_rows", "blocks"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {value}")


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


@dataclass
class Scores:
    """Mergeable results of scoring some pairs.

    Attributes:
        metrics: The running SOD metrics of the scored images.
        rows: One dict per scored image: key, pred, gt, image, height, width, mae, max_f, resized.
        resized: Keys of predictions resized to their ground truth's size.
        unreadable: URIs that could not be decoded (their pairs are not scored).
        tasks: Identifiers of the tasks that produced the parts (one entry per part).
    """

    metrics: SODMetrics = field(default_factory=SODMetrics)
    rows: list[dict] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def merge(self, other: Scores) -> Scores:
        """Adds ``other``'s images; returns ``self``, its lists kept sorted so merge order is moot."""
        self.metrics.merge(other.metrics)
        self.rows = sorted(self.rows + other.rows, key=lambda row: row["key"])
        self.resized = sorted(self.resized + other.resized)
        self.unreadable = sorted(self.unreadable + other.unreadable)
        self.tasks = self.tasks + other.tasks
        return self


@dataclass
class Evaluation:
    """Everything a report needs: the scores, the pairing, and where the data came from."""

    scores: Scores
    matching: Matching
    dataset: str
    predictions: str
    checkpoint: str | None = None

    def metrics(self) -> dict[str, float]:
        """``SODMetrics.compute()`` of the scored images."""
        return self.scores.metrics.compute()

    def counts(self) -> dict[str, int]:
        return {"images": len(self.scores.metrics), "pairs": len(self.matching.pairs),
                "preds_without_gt": len(self.matching.preds_without_gt),
                "gt_without_pred": len(self.matching.gt_without_pred),
                "resized": len(self.scores.resized), "unreadable": len(self.scores.unreadable)}


def common_dir(uris: list[str]) -> str:
    """The deepest folder holding every URI (the parent folder for a single one)."""
    if not uris:
        raise ValueError("common_dir needs at least one URI")
    parts = [uri.split("/")[:-1] for uri in uris]
    shared = parts[0]
    for other in parts[1:]:
        n = 0
        while n < min(len(shared), len(other)) and shared[n] == other[n]:
            n += 1
        shared = shared[:n]
    return "/".join(shared) or "/"


def _keyed(directory: str, what: str) -> dict[str, str]:
    """Relative path without suffix -> URI, for every image file under ``directory``."""
    keyed: dict[str, str] = {}
    for uri in storage.list_files(directory, suffixes=IMAGE_SUFFIXES):
        key = storage.relative_to(uri, directory).rsplit(".", 1)[0]
        if key in keyed:
            raise DataError(f"{keyed[key]} and {uri} are both the {what} of {key!r}; keep one of them")
        keyed[key] = uri
    return keyed


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
    preds, gts = _keyed(pred_dir, "prediction"), _keyed(gt_dir, "ground truth")
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
    images = _keyed(image_dir, "image")
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


def load_pair(pair: EvalPair) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decodes a pair; the prediction is resized to the ground truth's size when they differ.

    Returns:
        ``(pred uint8 HxW, gt uint8 HxW, resized)``.

    Raises:
        ImageDecodeError: A file is not a readable image (the message names it).
        FileNotFoundError: A file vanished.
    """
    gt = _decode(pair.gt)
    pred = _decode(pair.pred)
    if pred.shape == gt.shape:
        return pred, gt, False
    logger.debug("%s: prediction %s resized to the ground truth's %s", pair.key, pred.shape, gt.shape)
    return resize_mask(pred, gt.shape), gt, True


def _decode(uri: str) -> np.ndarray:
    try:
        return decode_mask(storage.read_bytes(uri))
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{uri}: {exc}") from None


def score_pairs(pairs: list[EvalPair], *, task: str = "local") -> Scores:
    """Scores pairs one by one in this process.

    Args:
        pairs: The pairs.
        task: Name recorded in ``Scores.tasks`` (a Ray task id in parallel runs).

    Returns:
        The :class:`Scores`; unreadable files are listed, not raised.
    """
    scores = Scores(tasks=[task])
    for i, pair in enumerate(pairs, 1):
        try:
            pred, gt, resized = load_pair(pair)
        except (ImageDecodeError, OSError) as exc:
            logger.warning("skipping %s: %s", pair.key, exc)
            scores.unreadable.append(_bad_uri(pair, exc))
            continue
        scores.metrics.update(pred, gt)
        scores.rows.append({"key": pair.key, "pred": pair.pred, "gt": pair.gt, "image": pair.image,
                            "height": gt.shape[0], "width": gt.shape[1], **image_scores(pred, gt),
                            "resized": resized})
        if resized:
            scores.resized.append(pair.key)
        if i % _PROGRESS_EVERY == 0:
            logger.info("scored %d/%d images", i, len(pairs))
    scores.rows.sort(key=lambda row: row["key"])
    scores.resized.sort()
    scores.unreadable.sort()
    return scores


def _bad_uri(pair: EvalPair, exc: BaseException) -> str:
    """Which file of the pair failed, from the error's message (which names it)."""
    return pair.pred if pair.pred in str(exc) else pair.gt


def finish_scores(scores: Scores, matching: Matching) -> None:
    """Warns about resized predictions; fails when not one pair could be read."""
    if scores.resized:
        logger.warning("%d predictions differ in size from their ground truth and were resized to it "
                       "(first: %s)", len(scores.resized), scores.resized[0])
    if not len(scores.metrics):
        raise DataError(f"none of the {len(matching.pairs)} pairs could be read (first: "
                        f"{scores.unreadable[0]}); check the files")


def evaluate_folders(pred: str, gt: str, *, images: str | None = None) -> Evaluation:
    """Single-process evaluation of a prediction folder against a ground-truth folder or DUTS root.

    Args:
        pred: Folder of predicted masks.
        gt: Folder of ground-truth masks, or a DUTS-layout root holding DUTS-TE.
        images: Folder of input images (optional, for contact sheets; guessed when omitted).

    Returns:
        The :class:`Evaluation`.
    """
    matching = prepare_folders(pred, gt, images=images)
    scores = score_pairs(matching.pairs)
    finish_scores(scores, matching)
    return Evaluation(scores=scores, matching=matching, dataset=gt, predictions=pred)


def resolve_eval_data(data: str, *, skip_unpaired: bool = False, val_fraction: float = 0.1,
                      seed: int = 0) -> tuple[str, list[Pair]]:
    """``(label, pairs)`` to evaluate for ``data``.

    Args:
        data: A DUTS-layout root, a root holding ``images/`` + ``masks/``, or ``"sample"`` (the
            embedded sample's held-out images, the ones training validates on).
        skip_unpaired: Leave unpaired files out instead of failing.
        val_fraction: The held-out share, when the root has no DUTS-TE (as in training).
        seed: The held-out draw's seed (as in training).
    """
    if data == SAMPLE_TOKEN:
        from basnet.sample import ensure_sample

        root = ensure_sample()
        label = f"embedded sample, held-out images ({root})"
    else:
        root = label = data
    pairs = evaluation_pairs(root, skip_unpaired=skip_unpaired, val_fraction=val_fraction, seed=seed)
    return label, pairs


@dataclass(frozen=True)
class WeightsPlan:
    """What ``--weights``/``--data`` resolve to, before anything is predicted."""

    weights: str
    dataset: str
    pairs: list[Pair]
    image_size: int


def plan_weights(weights: str, data: str, *, image_size: int | None = None,
                 skip_unpaired: bool = False) -> WeightsPlan:
    """Checks the weights and finds the pairs; the checkpoint's training config supplies defaults.

    The image size defaults to the training size (else 256) and a held-out split uses the
    training run's ``val_fraction`` and ``seed``, so a checkpoint is scored on what it validated on.

    Raises:
        CheckpointError: The weights cannot be read.
        DataError: Nothing to evaluate under ``data``.
    """
    from basnet.checkpoint import checkpoint_config

    trained = checkpoint_config(weights) or {}
    label, pairs = resolve_eval_data(data, skip_unpaired=skip_unpaired, seed=trained.get("seed", 0),
                                     val_fraction=trained.get("val_fraction", 0.1))
    size = image_size or trained.get("image_size") or _DEFAULT_IMAGE_SIZE
    return WeightsPlan(weights=weights, dataset=label, pairs=pairs, image_size=int(size))
