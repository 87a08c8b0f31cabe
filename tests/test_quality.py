"""Mask quality without ground truth (basnet.quality): the figures, the maps masks are rendered from,
and the rank statistics the evaluation reports (no Ray, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from basnet.quality import (QUALITY_COLUMNS, assess, finish, finish_map, least_confident_ratio, minmax,
                            spearman)


def disc(inside: float, outside: float, side: int = 32, radius: float = 8.0) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return np.where((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < radius ** 2, inside, outside).astype(np.float32)


def test_a_decided_object_is_confident_a_hesitant_one_is_not_and_an_empty_map_is_no_object():
    maps = np.stack([disc(0.999, 0.001), disc(0.6, 0.2), disc(0.001, 0.001), disc(0.45, 0.3)])
    figures = assess(maps, normalize="none")
    assert set(figures) == set(QUALITY_COLUMNS) and all(len(v) == 4 for v in figures.values())
    confident, hesitant, empty, faint = (dict(zip(figures, values)) for values in zip(*figures.values()))
    assert confident["confidence"] > 0.95 and not confident["no_object"]
    assert hesitant["confidence"] < 0.5 and not hesitant["no_object"]
    # nothing salient, decidedly: flagged, and sure of it
    assert empty["no_object"] and empty["confidence"] > 0.95 and empty["salient_share"] == 0.0
    # nothing over 0.5 but a faint bump: flagged, and unsure
    assert faint["no_object"] and faint["confidence"] < min(0.5, hesitant["confidence"])
    assert confident["salient_share"] == pytest.approx((maps[0] > 0.5).mean())
    assert confident["peak"] == pytest.approx(0.999)
    assert np.all((figures["confidence"] > 0) & (figures["confidence"] <= 1))


def test_the_expected_error_is_of_the_mask_as_written_so_a_stretched_empty_map_is_not_trusted():
    assert all(len(values) == 0 for values in assess(np.empty((0, 8, 8), np.float32)).values())
    noise = np.random.default_rng(0).random((32, 32), dtype=np.float32) * 0.002  # no object: low noise
    p = noise.astype(np.float64)
    expected = {("none", "keep"): (2 * p * (1 - p)).mean(),
                ("minmax", "keep"): (lambda w: (w * (1 - p) + (1 - w) * p).mean())(minmax(noise).astype(np.float64)),
                ("minmax", "empty"): p.mean(), ("none", "empty"): p.mean()}
    for (normalize, on_no_object), error in expected.items():
        prob, figures = finish(noise, normalize=normalize, on_no_object=on_no_object)
        assert figures["no_object"] and figures["expected_error"] == pytest.approx(error, rel=1e-5)
        assert figures["confidence"] == pytest.approx(2 ** (-error / 0.1), rel=1e-5)
        assert np.array_equal(prob, finish_map(noise, normalize=normalize, no_object=True, on_no_object=on_no_object))
    # stretching the model's noise to full contrast writes a mask it does not believe: about half wrong
    assert finish(noise)[1]["confidence"] < 0.05 < 0.95 < finish(noise, normalize="none")[1]["confidence"]
    # an object the model is sure of keeps its figures under either normalisation
    sure = disc(0.999, 0.001)
    assert min(finish(sure)[1]["confidence"], finish(sure, normalize="none")[1]["confidence"]) > 0.98


def test_finish_map_normalises_as_asked_and_empties_only_flagged_maps_under_empty():
    raw = disc(0.3, 0.1)
    stretched = finish_map(raw, normalize="minmax")
    assert stretched.min() == 0.0 and stretched.max() == pytest.approx(1.0)
    assert np.array_equal(stretched, minmax(raw[None])[0])
    assert np.array_equal(finish_map(raw, normalize="none"), raw)
    assert np.array_equal(finish_map(raw, normalize="minmax", no_object=True, on_no_object="keep"), stretched)
    assert not finish_map(raw, normalize="minmax", no_object=True, on_no_object="empty").any()
    assert np.array_equal(finish_map(raw, normalize="none", no_object=False, on_no_object="empty"), raw)
    with pytest.raises(ValueError, match="normalize"):
        finish_map(raw, normalize="max")


def test_spearman_matches_scipy_with_ties_and_the_least_confident_ratio_is_by_hand():
    rng = np.random.default_rng(0)
    a = np.round(rng.random(57), 1)  # many ties
    b = a * -2 + rng.normal(0, 0.3, 57)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    confidence = np.array([0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.95, 0.85, 0.75, 0.65])
    error = np.array([0.01, 0.5, 0.02, 0.03, 0.04, 0.05, 0.01, 0.02, 0.03, 0.04])
    assert least_confident_ratio(confidence, error) == pytest.approx(0.5 / error[confidence > 0.1].mean())
    assert np.isnan(spearman([1.0, 2.0], [2.0, 1.0]))
