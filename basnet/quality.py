"""How sure the model is of each mask, from its raw map, with no ground truth (NumPy only).

The figures are computed on the sigmoid of BASNet's refined output at the model's side, before any
normalisation: min-max stretching (the test protocol's) turns any map into a full-contrast one and
hides what the model thought. Per image:

- ``peak``: the map's largest value. Below 0.5 no pixel is called salient: ``no_object``.
- ``expected_error``: the mean of 2 p (1 - p) over the pixels: the mask's MAE as the model itself
  expects it (were its probabilities calibrated, a pixel of value p is wrong by p(1 - p) + (1 - p)p
  on average). Wide soft bands, faint blobs and hesitant objects raise it.
- ``salient_share``: the share of pixels over 0.5 (the object's area).
- ``confidence`` in [0, 1]: ``|2 peak - 1| * (1 - expected_error)``: how decided the model is that
  there is an object (or that there is none), then, among decided maps, how clean the mask is.

Chosen by measurement on held-out data with ground truth (docs/infer.md, "Which masks are wrong?").
``finish_map`` then gives the map a mask is rendered from: min-max normalised or raw
(``--normalize``), or empty for a ``no_object`` image under ``--on-no-object empty``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QUALITY_COLUMNS", "NORMALIZES", "ON_NO_OBJECT", "assess", "assess_tensor", "no_figures", "finish_map",
           "minmax", "spearman", "least_confident_ratio"]

NORMALIZES = ("minmax", "none")
ON_NO_OBJECT = ("keep", "empty")
# Per-image figures, in the order of the manifest's columns (float64, except no_object).
QUALITY_COLUMNS = ("confidence", "no_object", "peak", "expected_error", "salient_share")
NO_OBJECT_BELOW = 0.5  # peak under this: the model calls no pixel salient


def no_figures(n: int) -> dict[str, np.ndarray]:
    """The figures of ``n`` rows without a map (not pending: skipped, failed): NaN, and no_object False."""
    return {key: np.zeros(n, bool) if key == "no_object" else np.full(n, np.nan) for key in QUALITY_COLUMNS}


def assess(raw: np.ndarray) -> dict[str, np.ndarray]:
    """The quality figures of (N, S, S) raw sigmoid maps, one value per image for each of
    ``QUALITY_COLUMNS`` (NumPy arrays of N)."""
    flat = np.asarray(raw, dtype=np.float32).reshape(len(raw), -1)
    return _figures(flat.max(axis=1).astype(np.float64), (2.0 * flat * (1.0 - flat)).mean(axis=1, dtype=np.float64),
                    (flat > 0.5).mean(axis=1, dtype=np.float64))


def assess_tensor(prob) -> dict[str, np.ndarray]:
    """:func:`assess` of a torch tensor of (N, S, S) maps, reduced where the tensor is: a GPU's maps
    are judged on the GPU, and 3 numbers per image cross to the host, in one copy."""
    import torch

    flat = prob.reshape(len(prob), -1).float()
    figures = torch.stack([flat.amax(dim=1).double(), (2.0 * flat * (1.0 - flat)).double().mean(dim=1),
                           (flat > 0.5).double().mean(dim=1)]).cpu().numpy()
    return _figures(*figures)


def _figures(peak: np.ndarray, expected_error: np.ndarray, salient_share: np.ndarray) -> dict[str, np.ndarray]:
    confidence = np.abs(2.0 * peak - 1.0) * (1.0 - expected_error)
    return {"confidence": np.clip(confidence, 0.0, 1.0), "no_object": peak < NO_OBJECT_BELOW, "peak": peak,
            "expected_error": expected_error, "salient_share": salient_share}


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
