"""pysodmetrics used directly, the way its README shows: the reference the metric tests compare with."""

from __future__ import annotations

import warnings

import numpy as np
import py_sod_metrics


def pysod_metrics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, float], dict]:
    """Every metric pysodmetrics has, over (prediction, ground truth) pairs; and its F-measure results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = py_sod_metrics.Fmeasure()
    mae, sm, em, wfm = (py_sod_metrics.MAE(), py_sod_metrics.Smeasure(), py_sod_metrics.Emeasure(),
                        py_sod_metrics.WeightedFmeasure())
    for pred, gt in pairs:
        for metric in (fm, mae, sm, em, wfm):
            metric.step(pred=pred, gt=gt)
    f, e = fm.get_results(), em.get_results()["em"]
    values = {"mae": mae.get_results()["mae"], "max_f": f["fm"]["curve"].max(),
              "mean_f": f["fm"]["curve"].mean(), "adaptive_f": f["fm"]["adp"],
              "s_measure": sm.get_results()["sm"], "max_e": e["curve"].max(), "mean_e": e["curve"].mean(),
              "adaptive_e": e["adp"], "weighted_f": wfm.get_results()["wfm"]}
    return values, f
