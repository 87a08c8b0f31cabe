"""SODMetrics against pysodmetrics, and the relaxed boundary F-measure against brute force."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from pysod_reference import pysod_metrics

from basnet.metrics import METRIC_KEYS, SODMetrics, image_scores, relax_boundary_f

H, W = 48, 64


def _blob(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    """A smooth field in [0, 1]: a sum of two random Gaussian bumps."""
    ys, xs = np.mgrid[0:h, 0:w]
    field = np.zeros((h, w))
    for _ in range(2):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        sy, sx = rng.uniform(4, 12), rng.uniform(4, 16)
        field += np.exp(-((ys - cy) ** 2 / (2 * sy**2) + (xs - cx) ** 2 / (2 * sx**2)))
    return field / field.max()


def _pairs(n: int = 8, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (pred, gt) pairs (a thresholded blob as gt, a noisy version of the blob as pred), then
    one more whose gt is empty (an image without a salient object)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        field = _blob(rng)
        gt = np.where(field > 0.5, 255, 0).astype(np.uint8)
        gt[field > 0.45] |= np.uint8(100) * (i % 2)  # soft edges on half of them (binarised > 128)
        pred = np.clip(0.7 * field + 0.3 * rng.random((H, W)) * (i / n), 0, 1)
        pairs.append(((pred * 255).astype(np.uint8), gt))
    pairs.append((pairs[0][0], np.zeros((H, W), np.uint8)))
    return pairs


def _filled(pairs: list[tuple[np.ndarray, np.ndarray]]) -> SODMetrics:
    metrics = SODMetrics()
    for pred, gt in pairs:
        metrics.update(pred, gt)
    return metrics


def test_sod_metrics_equal_pysodmetrics_run_directly() -> None:
    pairs = _pairs()
    got = _filled(pairs).compute()
    want, _ = pysod_metrics(pairs)
    assert list(got) == list(METRIC_KEYS)
    assert all(type(value) is float for value in got.values())
    for key, value in want.items():
        # Equal up to the last bits: SODMetrics sums exactly (math.fsum), numpy pairwise.
        assert got[key] == pytest.approx(float(value), rel=1e-12, abs=1e-15), key


def test_curves_equal_pysodmetrics_mean_curves() -> None:
    pairs = _pairs()
    curves = _filled(pairs).curves()
    _, f = pysod_metrics(pairs)
    assert set(curves) == {"precision", "recall", "fmeasure"}
    for key, want in (("precision", f["pr"]["p"]), ("recall", f["pr"]["r"]), ("fmeasure", f["fm"]["curve"])):
        assert curves[key].shape == (256,)
        np.testing.assert_allclose(curves[key], want, rtol=1e-12, atol=1e-15)


def test_image_scores_equal_one_image_sod_metrics() -> None:
    pred, gt = _pairs(1)[0]
    full = _filled([(pred, gt)]).compute()
    assert image_scores(pred, gt) == {"mae": full["mae"], "max_f": full["max_f"]}


def test_merge_of_two_halves_equals_one_object_in_any_order() -> None:
    pairs = _pairs()
    whole = _filled(pairs).compute()
    first, second = pairs[:4], pairs[4:]
    assert _filled(first).merge(_filled(second)).compute() == whole
    assert _filled(second).merge(_filled(first)).compute() == whole
    merged = _filled(second).merge(_filled(first))
    assert len(merged) == len(pairs)
    for key, curve in _filled(pairs).curves().items():
        np.testing.assert_array_equal(merged.curves()[key], curve)


def test_merge_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="SODMetrics"):
        SODMetrics().merge({"mae": 0.1})


def test_pickle_round_trip_keeps_every_value() -> None:
    pairs = _pairs(3)
    metrics = _filled(pairs)
    restored = pickle.loads(pickle.dumps(metrics))
    assert len(restored) == len(pairs)
    assert restored.compute() == metrics.compute()
    restored.update(*_pairs(1, seed=5)[0])
    assert len(restored) == len(pairs) + 1 and len(metrics) == len(pairs)


def test_size_mismatch_and_bad_arrays_raise_value_error() -> None:
    pred, gt = _pairs(1)[0]
    with pytest.raises(ValueError, match="differ in size"):
        SODMetrics().update(pred, gt[:-1])
    with pytest.raises(ValueError, match="differ in size"):
        relax_boundary_f(pred[:, :-2], gt)
    with pytest.raises(ValueError, match="uint8 HxW"):
        SODMetrics().update(pred.astype(np.float32) / 255, gt)
    with pytest.raises(ValueError, match="uint8 HxW"):
        image_scores(np.stack([pred] * 3, axis=-1), gt)


def test_compute_without_images_raises_value_error() -> None:
    with pytest.raises(ValueError, match="no images"):
        SODMetrics().compute()


def test_inverted_prediction_scores_worse_on_every_metric() -> None:
    pairs = _pairs(4, seed=3)
    good = _filled(pairs).compute()
    bad = _filled([(255 - pred, gt) for pred, gt in pairs]).compute()
    assert bad["mae"] > good["mae"]
    for key in METRIC_KEYS:
        if key != "mae":
            assert bad[key] < good[key], key


# --- relaxed boundary F-measure ---------------------------------------------------------------

def _square(top: int, left: int, side: int = 20, h: int = H, w: int = W) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[top:top + side, left:left + side] = 255
    return mask


def _brute_boundary(mask: np.ndarray) -> list[tuple[int, int]]:
    """Foreground pixels with a background (or off-image) pixel among their 8 neighbours."""
    h, w = mask.shape
    edge = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            around = [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            if any(not (0 <= yy < h and 0 <= xx < w) or not mask[yy, xx] for yy, xx in around):
                edge.append((y, x))
    return edge


def _brute_share(points: list[tuple[int, int]], targets: list[tuple[int, int]], radius: float) -> float:
    near = sum(any((y - ty) ** 2 + (x - tx) ** 2 <= radius**2 for ty, tx in targets) for y, x in points)
    return near / len(points)


def _brute_relax_f(pred: np.ndarray, gt: np.ndarray, radius: float = 3, beta2: float = 0.3) -> float:
    pred_edge, gt_edge = _brute_boundary(pred > 127.5), _brute_boundary(gt > 128)
    if not pred_edge or not gt_edge:
        return float(not pred_edge and not gt_edge)
    p, r = _brute_share(pred_edge, gt_edge, radius), _brute_share(gt_edge, pred_edge, radius)
    return 0.0 if p + r == 0 else (1 + beta2) * p * r / (beta2 * p + r)


def test_relax_boundary_f_is_one_for_identical_masks() -> None:
    for _, gt in _pairs(3):
        assert relax_boundary_f(gt, gt) == 1.0


def test_relax_boundary_f_tolerates_three_pixels_then_falls() -> None:
    gt = _square(14, 20)
    for shift in (1, 2, 3):
        assert relax_boundary_f(_square(14, 20 + shift), gt) == 1.0, shift
    scores = [relax_boundary_f(_square(14, 20 + shift), gt) for shift in (5, 8)]
    assert all(type(score) is float for score in scores)
    assert 0 < scores[1] < scores[0] < 1


def test_relax_boundary_f_equals_brute_force() -> None:
    rng = np.random.default_rng(7)
    cases = [(_square(2, 3, 10, 24, 24), _square(5, 4, 12, 24, 24)),
             (_square(0, 0, 10, 24, 24), _square(1, 2, 9, 24, 24))]  # masks touching the border
    for _ in range(4):
        gt = np.where(_blob(rng, 24, 28) > 0.4, 255, 0).astype(np.uint8)
        cases.append(((_blob(rng, 24, 28) * 255).astype(np.uint8), gt))
    for radius in (1, 3, 4.5):
        for pred, gt in cases:
            assert math.isclose(relax_boundary_f(pred, gt, radius=radius), _brute_relax_f(pred, gt, radius),
                                rel_tol=1e-12), radius


def test_relax_boundary_f_edge_cases() -> None:
    empty, square = np.zeros((24, 24), np.uint8), _square(4, 4, 8, 24, 24)
    assert relax_boundary_f(empty, empty) == 1.0
    assert relax_boundary_f(square, empty) == 0.0
    assert relax_boundary_f(empty, square) == 0.0
    assert relax_boundary_f(square // 255 * 128, square) == 1.0  # 128 / 255 > 0.5: foreground
    assert relax_boundary_f(square // 255 * 127, square) == 0.0  # 127 / 255 < 0.5: nothing predicted
