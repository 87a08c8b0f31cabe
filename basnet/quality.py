"""How sure the model is of each mask, from its raw map, with no ground truth (NumPy only).

The figures are computed from the sigmoid of BASNet's refined output at the model's side, before any
normalisation, read as the model's probability that each pixel is salient. Per image:

- ``peak``: the map's largest value. Below 0.5 no pixel is called salient: ``no_object``.
- ``expected_error``: the MAE the model itself expects of the mask as it is written: with ``p`` the
  raw map and ``w`` the map the mask is rendered from (:func:`finish_map`: min-max normalised, the
  raw map itself, or empty), the mean over the pixels of ``w (1 - p) + (1 - w) p``, the chance-
  weighted error were the truth drawn from ``p``. For the raw map that is ``2 p (1 - p)``; min-max
  stretching a map the model left low everywhere (a scene without an object, an object it missed)
  writes a full-contrast mask the model itself does not believe, and the figure says so.
- ``salient_share``: the share of pixels over 0.5 (the object's area).
- ``confidence`` in (0, 1]: ``2 ** (-expected_error / 0.1)``: 1 for a mask the model expects to be
  exact, halved for each 0.1 of expected MAE (0.5 at 0.1, the evaluation's line for an object found).

Chosen by measurement on held-out data with ground truth (docs/infer.md, "Which masks are wrong?").
The figures hold as far as the map's values are probabilities: BCE trains them to be, BASNet's
hybrid loss (its IoU term, measured; SSIM not apart from it) sharpens them past the model's real doubt.
The figures depend on ``--normalize`` and ``--on-no-object`` because the mask does: :func:`finish`
gives both, as the bulk job's write stage and the service use them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QUALITY_COLUMNS", "NORMALIZES", "ON_NO_OBJECT", "assess", "finish", "no_figures", "finish_map",
           "minmax", "spearman", "least_confident_ratio"]

NORMALIZES = ("minmax", "none")
ON_NO_OBJECT = ("keep", "empty")
# Per-image figures, in the order of the manifest's columns (float64, except no_object).
QUALITY_COLUMNS = ("confidence", "no_object", "peak", "expected_error", "salient_share")
NO_OBJECT_BELOW = 0.5  # peak under this: the model calls no pixel salient
ERROR_HALVES_CONFIDENCE = 0.1  # each 0.1 of expected MAE halves the confidence


def no_figures(n: int) -> dict[str, np.ndarray]:
    """The figures of ``n`` rows without a map (not pending: skipped, failed): NaN, and no_object False."""
    return {key: np.zeros(n, bool) if key == "no_object" else np.full(n, np.nan) for key in QUALITY_COLUMNS}


def assess(raw: np.ndarray, *, normalize: str = "minmax", on_no_object: str = "keep") -> dict[str, np.ndarray]:
    """The quality figures of (N, S, S) raw sigmoid maps whose masks are written as ``normalize`` and
    ``on_no_object`` say: one value per image for each of ``QUALITY_COLUMNS`` (NumPy arrays of N)."""
    return _judge(raw, normalize, on_no_object)[1]


def finish(raw: np.ndarray, *, normalize: str = "minmax", on_no_object: str = "keep") -> tuple[np.ndarray, dict]:
    """One (S, S) raw map's mask map (:func:`finish_map`) and its figures (:func:`assess`, as Python
    scalars): what the write stage and the service render and report."""
    written, figures = _judge(np.asarray(raw)[None], normalize, on_no_object)
    return written[0], {key: values[0].item() for key, values in figures.items()}


def _judge(raw: np.ndarray, normalize: str, on_no_object: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The maps masks are rendered from, and their figures."""
    maps = np.asarray(raw, dtype=np.float32)
    flat = maps.reshape(len(maps), int(np.prod(maps.shape[1:])))
    peak = flat.max(axis=1, initial=0.0).astype(np.float64)
    no_object = peak < NO_OBJECT_BELOW
    written = np.stack([finish_map(m, normalize=normalize, no_object=bool(flag), on_no_object=on_no_object)
                        for m, flag in zip(maps, no_object)]) if len(maps) else maps
    w = written.reshape(flat.shape)
    expected_error = (w * (1.0 - flat) + (1.0 - w) * flat).mean(axis=1, dtype=np.float64)
    return written, {"confidence": np.exp2(-expected_error / ERROR_HALVES_CONFIDENCE), "no_object": no_object,
                     "peak": peak, "expected_error": expected_error,
                     "salient_share": (flat > 0.5).mean(axis=1, dtype=np.float64)}


def minmax(raw: np.ndarray) -> np.ndarray:
    """Min-max normalisation of each (H, W) map of a (..., H, W) array, as the test protocol does."""
    lo = raw.min(axis=(-2, -1), keepdims=True)
    hi = raw.max(axis=(-2, -1), keepdims=True)
    return ((raw - lo) / np.maximum(hi - lo, np.float32(1e-8))).astype(np.float32, copy=False)


def finish_map(raw: np.ndarray, *, normalize: str = "minmax", no_object: bool = False,
               on_no_object: str = "keep") -> np.ndarray:
    """The (S, S) map a mask is rendered from: ``raw`` min-max normalised (``minmax``) or as it is
    (``none``: the sigmoid itself); all zeros when the image is ``no_object`` and ``on_no_object``
    is ``empty``."""
    if normalize not in NORMALIZES:
        raise ValueError(f"unknown normalize {normalize!r}")
    if on_no_object not in ON_NO_OBJECT:
        raise ValueError(f"unknown on_no_object {on_no_object!r}")
    raw = np.asarray(raw, dtype=np.float32)
    if no_object and on_no_object == "empty":
        return np.zeros_like(raw)
    return minmax(raw) if normalize == "minmax" else raw


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equal-length arrays (NaN for fewer than 3 or a constant one)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def least_confident_ratio(confidence: np.ndarray, error: np.ndarray, share: float = 0.1) -> float:
    """The mean error of the least confident ``share`` of the images (at least one) over that of the
    rest (NaN for fewer than 2 images; inf when the rest's is 0)."""
    confidence, error = np.asarray(confidence, np.float64), np.asarray(error, np.float64)
    if len(confidence) < 2:
        return float("nan")
    order = np.argsort(confidence, kind="mergesort")
    k = max(1, round(share * len(order)))
    low, rest = error[order[:k]].mean(), error[order[k:]].mean()
    return float(low / rest) if rest > 0 else float("inf")
