"""Salient-object-detection metrics over a set of images, mergeable across workers.

MAE, F-measure (max, mean, adaptive; beta^2 = 0.3 over 256 thresholds), S-measure,
E-measure (max, mean, adaptive) and weighted F-measure come from ``pysodmetrics``
(``py_sod_metrics``), which matches the standard MATLAB toolbox. The relaxed boundary
F-measure of the BASNet paper (Qin et al., CVPR 2019) is in no package and lives here.

``SODMetrics`` keeps one row of values per image, so partial results of several workers
merge exactly, and ``compute`` takes exactly rounded means (``math.fsum``): the result does not
depend on how the images were split or in which order the parts were merged.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

__all__ = ["GT_THRESHOLD", "METRIC_KEYS", "SODMetrics", "image_scores", "mae_as_written", "relax_boundary_f"]

logger = logging.getLogger(__name__)

METRIC_KEYS = ("mae", "max_f", "mean_f", "adaptive_f", "s_measure", "max_e", "mean_e", "adaptive_e",
               "weighted_f", "relax_boundary_f")
_SCALARS = ("mae", "adaptive_f", "s_measure", "adaptive_e", "weighted_f", "relax_boundary_f")
# Per-threshold curves of one image, 256 values each; index i is the threshold 255 - i
# (pysodmetrics counts the pixels >= each threshold from the top down).
_CURVES = ("precision", "recall", "fmeasure", "emeasure")
_BETA2 = 0.3  # the F-measure's weight of precision, as in every SOD paper
GT_THRESHOLD = 128  # ground truth is foreground where > 128 (pysodmetrics, the MATLAB toolbox)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    for name, array in (("pred", pred), ("gt", gt)):
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype != np.uint8:
            shape = getattr(array, "shape", None)
            raise ValueError(f"{name} must be a uint8 HxW array, got {type(array).__name__} "
                             f"{getattr(array, 'dtype', '')} {shape}: pass one grayscale 8-bit map")
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in size: resize the prediction "
                         "to the ground truth's size before scoring")


def _pysod():
    """pysodmetrics, imported when an image is first scored: it imports scikit-learn (about 1.2 s
    and 100 MB), which processes that only build ``SODMetrics`` (a job's driver, a Tune trial's
    launcher) need not pay."""
    import py_sod_metrics

    return py_sod_metrics


def _fmeasure():
    # pysodmetrics 1.6 warns that Fmeasure will make way for FmeasureV2; its values are the
    # reference ones, and the warning would repeat once per image.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will be removed.*")
        return _pysod().Fmeasure(beta=_BETA2)


def _pysod_row(pred: np.ndarray, gt: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The pysodmetrics values of one image: scalars and 256-threshold curves."""
    pysod = _pysod()
    fm, mae, sm, em, wfm = _fmeasure(), pysod.MAE(), pysod.Smeasure(), pysod.Emeasure(), pysod.WeightedFmeasure()
    for metric in (fm, mae, sm, em, wfm):
        metric.step(pred=pred, gt=gt)
    # Each object saw one image, so its "mean over images" is that image's value, exactly.
    f, e = fm.get_results(), em.get_results()["em"]
    scalars = {"mae": float(mae.get_results()["mae"]), "adaptive_f": float(f["fm"]["adp"]),
               "s_measure": float(sm.get_results()["sm"]), "adaptive_e": float(e["adp"]),
               "weighted_f": float(wfm.get_results()["wfm"])}
    curves = {"precision": f["pr"]["p"], "recall": f["pr"]["r"], "fmeasure": f["fm"]["curve"],
              "emeasure": e["curve"]}
    return scalars, {k: np.asarray(v, dtype=np.float64) for k, v in curves.items()}


def _boundary(mask: np.ndarray) -> np.ndarray:
    # Outside the image counts as background (border_value=0): a mask touching the border has
    # a boundary there, so a fully inverted prediction gets the image frame as extra boundary.
    eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    return mask & ~eroded


def _share_within(points: np.ndarray, targets: np.ndarray, radius: float) -> float:
    """Share of the ``points`` pixels lying within ``radius`` px of some ``targets`` pixel."""
    distance = ndimage.distance_transform_edt(~targets)  # to the nearest target pixel
    return int(np.count_nonzero(distance[points] <= radius)) / int(np.count_nonzero(points))


def relax_boundary_f(pred: np.ndarray, gt: np.ndarray, *, radius: float = 3, beta2: float = 0.3) -> float:
    """The relaxed boundary F-measure (relaxFb) of the BASNet paper for one image.

    The prediction is binarised at 0.5 (``pred / 255 > 0.5``) and the ground truth at > 128;
    a boundary is the mask minus its 3x3 erosion. Precision is the share of predicted boundary
    pixels within ``radius`` px (Euclidean) of a ground-truth boundary pixel, recall the converse.

    Args:
        pred: uint8 HxW prediction.
        gt: uint8 HxW ground truth of the same size.
        radius: the slack in pixels.
        beta2: the weight of precision (beta squared).

    Returns:
        F in [0, 1]: 1.0 when both masks are empty, 0.0 when only one is.
    """
    _check_pair(pred, gt)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    pred_edge = _boundary(pred.astype(np.float64) / 255 > 0.5)
    gt_edge = _boundary(gt > GT_THRESHOLD)
    if not pred_edge.any() or not gt_edge.any():
        return float(not pred_edge.any() and not gt_edge.any())
    precision = _share_within(pred_edge, gt_edge, radius)
    recall = _share_within(gt_edge, pred_edge, radius)
    if precision + recall == 0:
        return 0.0
    return (1 + beta2) * precision * recall / (beta2 * precision + recall)


def image_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """MAE and max F-measure of one image (as pysodmetrics): cheap per-image figures for a table.

    Args:
        pred: uint8 HxW prediction.
        gt: uint8 HxW ground truth of the same size.

    Returns:
        ``{"mae": float, "max_f": float}``.
    """
    _check_pair(pred, gt)
    fm, mae = _fmeasure(), _pysod().MAE()
    fm.step(pred=pred, gt=gt)
    mae.step(pred=pred, gt=gt)
    return {"mae": float(mae.get_results()["mae"]), "max_f": float(np.max(fm.get_results()["fm"]["curve"]))}


def mae_as_written(pred: np.ndarray, gt: np.ndarray) -> float:
    """The MAE of one mask as it was written: ``|pred / 255 - (gt > 128)|`` averaged over the pixels.

    The protocol's MAE (:func:`image_scores`, pysodmetrics, the MATLAB toolbox) first stretches each
    prediction to 0-1, so a dark mask (``--normalize none``'s sigmoid of a scene the model calls
    empty) is scored as if it were its own min-max stretch. This one is not: it is the error of the
    mask a user gets, the figure the mask confidence estimates.

    Args:
        pred: uint8 HxW prediction.
        gt: uint8 HxW ground truth of the same size.
    """
    _check_pair(pred, gt)
    return float(np.abs(pred.astype(np.float64) / 255 - (gt > GT_THRESHOLD)).mean())


def _exact_mean(values: Iterable[float], count: int) -> float:
    return math.fsum(values) / count


def _exact_column_mean(rows: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(rows)  # (images, 256)
    return np.array([_exact_mean(column, len(rows)) for column in stacked.T.tolist()])


class SODMetrics:
    """Accumulates SOD metrics image by image; ``merge`` combines workers' partial results.

    Picklable (plain lists of floats and arrays), so it travels between Ray tasks. Memory is
    about 8 KB per image (four 256-threshold curves in float64).
    """

    def __init__(self) -> None:
        self._scalars: dict[str, list[float]] = {key: [] for key in _SCALARS}
        self._curves: dict[str, list[np.ndarray]] = {key: [] for key in _CURVES}

    def __len__(self) -> int:
        return len(self._scalars["mae"])

    def __repr__(self) -> str:
        return f"SODMetrics(images={len(self)})"

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Scores one image.

        Args:
            pred: uint8 HxW prediction (0..255).
            gt: uint8 HxW ground truth of the same size, foreground where > 128.

        Raises:
            ValueError: the arrays are not uint8 HxW or differ in size.
        """
        _check_pair(pred, gt)
        scalars, curves = _pysod_row(pred, gt)
        scalars["relax_boundary_f"] = relax_boundary_f(pred, gt)
        for key, value in scalars.items():
            self._scalars[key].append(value)
        for key, curve in curves.items():
            self._curves[key].append(curve)

    def merge(self, other: SODMetrics) -> SODMetrics:
        """Adds the images of ``other`` to this object; returns ``self``."""
        if not isinstance(other, SODMetrics):
            raise TypeError(f"can only merge SODMetrics, got {type(other).__name__}")
        for key in _SCALARS:
            self._scalars[key].extend(other._scalars[key])
        for key in _CURVES:
            self._curves[key].extend(other._curves[key])
        return self

    def _require_images(self) -> None:
        if not len(self):
            raise ValueError("SODMetrics has seen no images: call update() with at least one pair")

    def curves(self) -> dict[str, np.ndarray]:
        """Mean precision, recall and F-measure over the images, per threshold.

        Returns:
            ``{"precision", "recall", "fmeasure"}``, each (256,) float64; index i is the
            threshold 255 - i, as pysodmetrics orders them.
        """
        self._require_images()
        return {key: _exact_column_mean(self._curves[key]) for key in ("precision", "recall", "fmeasure")}

    def compute(self) -> dict[str, float]:
        """All metrics over the images seen, as Python floats keyed by ``METRIC_KEYS``."""
        self._require_images()
        means = {key: _exact_mean(values, len(self)) for key, values in self._scalars.items()}
        f_curve = _exact_column_mean(self._curves["fmeasure"])
        e_curve = _exact_column_mean(self._curves["emeasure"])
        means.update(max_f=float(f_curve.max()), mean_f=float(f_curve.mean()),
                     max_e=float(e_curve.max()), mean_e=float(e_curve.mean()))
        return {key: means[key] for key in METRIC_KEYS}
