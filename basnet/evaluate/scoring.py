"""Scoring predicted saliency maps against ground truth in one process (no Ray).

Each pair is scored at the ground truth's original size (docs/protocol.md): a prediction of another
size is resized to it bilinearly and counted. Files that cannot be decoded are counted and
skipped. :class:`Scores` holds mergeable partial results, so :mod:`basnet.evaluate.ray_scoring`
scores parts in parallel and merges them into exactly what :func:`score_pairs` gives on the whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from basnet import storage
from basnet.errors import DataError
from basnet.evaluate.matching import EvalPair, Matching, prepare_folders
from basnet.imaging import ImageDecodeError, decode_mask
from basnet.metrics import GT_THRESHOLD, SODMetrics, image_scores, mae_as_written
from basnet.transforms import resize_mask

__all__ = ["Scores", "Evaluation", "load_pair", "score_pairs", "finish_scores", "evaluate_folders"]

logger = logging.getLogger(__name__)

_PROGRESS_EVERY = 200  # images between progress lines of a single-process run


@dataclass
class Scores:
    """Mergeable results of scoring some pairs.

    Attributes:
        metrics: The running SOD metrics of the scored images.
        rows: One dict per scored image: key, pred, gt, image, height, width, mae, max_f (the
            protocol's, of the prediction min-max stretched), mae_as_written (of the mask as it is,
            :func:`basnet.metrics.mae_as_written`), resized, gt_empty (the ground truth holds no
            object); with ``--weights``, also the masks' quality figures (``basnet.quality.QUALITY_COLUMNS``).
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
    refine: str | None = None  # how the masks were taken to full size (known with --weights only)
    plain_metrics: dict[str, float] | None = None  # with --refine guided: the plain path's, for comparison
    normalize: str | None = None  # how the masks' maps were normalised (known with --weights only)
    on_no_object: str | None = None

    def metrics(self) -> dict[str, float]:
        """``SODMetrics.compute()`` of the scored images."""
        return self.scores.metrics.compute()

    def counts(self) -> dict[str, int]:
        return {"images": len(self.scores.metrics), "pairs": len(self.matching.pairs),
                "preds_without_gt": len(self.matching.preds_without_gt),
                "gt_without_pred": len(self.matching.gt_without_pred),
                "resized": len(self.scores.resized), "unreadable": len(self.scores.unreadable)}


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
                            "mae_as_written": mae_as_written(pred, gt), "resized": resized,
                            "gt_empty": not bool((gt > GT_THRESHOLD).any())})
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
