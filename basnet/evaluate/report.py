"""The evaluation's outputs: metrics.json, metrics.md, per_image.parquet, curves and contact sheets.

Everything is written through :mod:`basnet.storage`, so ``--out`` may be local or ``s3://``.
Plots use matplotlib's Agg canvas directly (no pyplot, no display); contact sheets are composed
with numpy and Pillow at a fixed tile size, so their pixel size depends only on the row count.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np

from basnet import storage
from basnet.evaluate.matching import EvalPair
from basnet.evaluate.scoring import Evaluation, load_pair
from basnet.imaging import ImageDecodeError, decode_image, encode_png, sheet
from basnet.quality import QUALITY_COLUMNS, least_confident_ratio, spearman

__all__ = ["PAPER_BASNET_DUTS_TE", "TABLE_COLUMNS", "metrics_table", "metrics_document", "write_report",
           "plot_pr_curve", "plot_f_curve", "contact_sheet", "sheet_size", "summary_text",
           "PLOT_SIZE", "REPORT_FILES"]

logger = logging.getLogger(__name__)

# The BASNet paper's DUTS-TE row (Qin et al., CVPR 2019): its comparison gives these three only.
PAPER_BASNET_DUTS_TE = {"max_f": 0.860, "relax_boundary_f": 0.758, "mae": 0.047}
# (column title, SODMetrics key), the paper's three first.
TABLE_COLUMNS = (("maxF", "max_f"), ("relaxFb", "relax_boundary_f"), ("MAE", "mae"),
                 ("S-measure", "s_measure"), ("meanF", "mean_f"), ("adpF", "adaptive_f"), ("maxE", "max_e"), ("meanE", "mean_e"),
                 ("adpE", "adaptive_e"), ("wF", "weighted_f"))
PLOT_SIZE = (640, 480)  # pixels (width, height) of pr_curve.png and f_curve.png
_DPI = 100
TILE = 128  # side of one contact-sheet cell
REPORT_FILES = ("metrics.json", "metrics.md", "per_image.parquet", "pr_curve.png", "f_curve.png",
                "worst.png", "best.png")
_COLUMNS = ("image", "ground truth", "prediction", "error: +red -cyan")


def metrics_table(metrics: dict[str, float], *, label: str = "this run",
                  others: dict[str, dict[str, float]] | None = None) -> str:
    """A markdown table of ``metrics`` (and ``others``: label -> metrics, below it) above the paper's
    BASNet DUTS-TE row (3 decimals, as papers)."""
    header = "| | " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [f"| {name} | " + " | ".join(f"{values[key]:.3f}" for _, key in TABLE_COLUMNS) + " |"
            for name, values in {label: metrics, **(others or {})}.items()]
    paper_values = (f"{PAPER_BASNET_DUTS_TE[key]:.3f}" if key in PAPER_BASNET_DUTS_TE else "-"
                    for _, key in TABLE_COLUMNS)
    paper = "| BASNet, paper (DUTS-TE) | " + " | ".join(paper_values) + " |"
    return "\n".join((header, rule, *rows, paper))


def _table(evaluation: Evaluation) -> str:
    """This evaluation's table; a guided one has the plain path's row beneath its own."""
    if evaluation.plain_metrics is None:
        return metrics_table(evaluation.metrics())
    return metrics_table(evaluation.metrics(), label=f"refine {evaluation.refine}",
                         others={"refine none (plain)": evaluation.plain_metrics})


def _counts_line(evaluation: Evaluation) -> str:
    c = evaluation.counts()
    return (f"{c['images']} images scored; {c['preds_without_gt']} predictions without ground truth, "
            f"{c['gt_without_pred']} ground-truth masks without prediction, {c['resized']} predictions "
            f"resized to their ground truth, {c['unreadable']} unreadable files")


FOUND_MAE = 0.1  # an object counts as found by its mask when the image's MAE is under this


def confidence_report(rows: list[dict]) -> dict | None:
    """How well the masks' confidence ranks their errors (None when the rows carry no confidence):
    Spearman's correlation of confidence with per-image MAE (good: strongly negative), the mean MAE
    of the least confident tenth over the rest's (good: well above 1), and how often ``no_object``
    was flagged on scenes without an object and on objects the mask found (MAE under 0.1). The MAE
    is the mask's as written (``mae_as_written``), not the protocol's of its min-max stretch: under
    ``--normalize none`` the two differ, and the confidence judges the mask the user gets."""
    scored = [row for row in rows if row.get("confidence") is not None and not np.isnan(row["confidence"])]
    if not scored:
        return None
    confidence = np.array([row["confidence"] for row in scored])
    mae = np.array([row["mae_as_written"] for row in scored])
    flagged = np.array([bool(row["no_object"]) for row in scored])
    empty = np.array([bool(row.get("gt_empty")) for row in scored])
    found = ~empty & (mae < FOUND_MAE)
    return {"images": len(scored), "spearman_confidence_mae": spearman(confidence, mae),
            "least_confident_tenth_mae_ratio": least_confident_ratio(confidence, mae),
            "no_object": int(flagged.sum()), "empty_scenes": int(empty.sum()),
            "no_object_on_empty_scenes": int((flagged & empty).sum()), "found_objects": int(found.sum()),
            "no_object_on_found_objects": int((flagged & found).sum())}


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f} %)" if whole else "0/0"


def confidence_line(report: dict | None) -> str:
    """The confidence report in one line (empty without one)."""
    if report is None:
        return ""
    return (f"confidence against per-image MAE over {report['images']} images: Spearman "
            f"{report['spearman_confidence_mae']:+.3f}, least confident tenth's MAE "
            f"{report['least_confident_tenth_mae_ratio']:.2f}x the rest's; no_object on "
            f"{_share(report['no_object_on_empty_scenes'], report['empty_scenes'])} scenes without an object, on "
            f"{_share(report['no_object_on_found_objects'], report['found_objects'])} objects found "
            f"(MAE < {FOUND_MAE:g})")


def metrics_document(evaluation: Evaluation) -> dict:
    """The content of metrics.json."""
    matching, scores = evaluation.matching, evaluation.scores
    return {"metrics": evaluation.metrics(), "dataset": evaluation.dataset,
            "checkpoint": evaluation.checkpoint, "predictions": evaluation.predictions,
            "counts": evaluation.counts(), "preds_without_gt": matching.preds_without_gt,
            "gt_without_pred": matching.gt_without_pred, "resized": scores.resized,
            "unreadable": scores.unreadable, "parallel_tasks": len(scores.tasks),
            "refine": evaluation.refine, "plain_metrics": evaluation.plain_metrics,
            "normalize": evaluation.normalize, "on_no_object": evaluation.on_no_object,
            "confidence": confidence_report(scores.rows),
            "paper": {"name": "BASNet (Qin et al., CVPR 2019) on DUTS-TE", **PAPER_BASNET_DUTS_TE}}


def _markdown(evaluation: Evaluation) -> str:
    lines = [f"# Evaluation of {evaluation.checkpoint or evaluation.predictions}", "",
             f"- data: `{evaluation.dataset}`", f"- predictions: `{evaluation.predictions}`",
             f"- {_counts_line(evaluation)}", *_confidence_item(evaluation), "", _table(evaluation), "",
             "F-measures use beta^2 = 0.3 over 256 thresholds; relaxFb binarises at 0.5 with a 3 px "
             "slack; all at each ground truth's original size.", ""]
    return "\n".join(lines)


def _confidence_item(evaluation: Evaluation) -> list[str]:
    line = confidence_line(confidence_report(evaluation.scores.rows))
    return [f"- {line}"] if line else []


def summary_text(evaluation: Evaluation, out: str) -> str:
    """What a job prints at the end: where the report went, the counts, the confidence's ranking of
    the errors (with --weights), then the table (last)."""
    line = confidence_line(confidence_report(evaluation.scores.rows))
    return "\n".join((f"evaluated {evaluation.checkpoint or evaluation.predictions} on {evaluation.dataset}",
                      _counts_line(evaluation), *([line] if line else []),
                      f"report: {out} ({', '.join(REPORT_FILES)})", "", _table(evaluation)))


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png_of(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)  # no bbox_inches: the size stays PLOT_SIZE
    return buffer.getvalue()


def plot_pr_curve(curves: dict[str, np.ndarray], title: str) -> bytes:
    """Precision against recall over the 256 thresholds, the max-F point marked; PNG bytes."""
    fig, ax = _figure()
    best = int(np.argmax(curves["fmeasure"]))
    ax.plot(curves["recall"], curves["precision"], color="tab:blue", label="this run")
    ax.plot(curves["recall"][best], curves["precision"][best], "o", color="tab:red",
            label=f"max F {curves['fmeasure'][best]:.3f} (threshold {255 - best})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return _png_of(fig)


def plot_f_curve(curves: dict[str, np.ndarray], title: str) -> bytes:
    """F-measure (beta^2 = 0.3) against the binarisation threshold; PNG bytes."""
    fig, ax = _figure()
    thresholds = 255 - np.arange(len(curves["fmeasure"]))  # index i is threshold 255 - i
    best = int(np.argmax(curves["fmeasure"]))
    ax.plot(thresholds, curves["fmeasure"], color="tab:blue", label="F-measure")
    ax.axhline(float(np.mean(curves["fmeasure"])), color="tab:gray", linestyle="--",
               label=f"mean F {np.mean(curves['fmeasure']):.3f}")
    ax.plot(thresholds[best], curves["fmeasure"][best], "o", color="tab:red",
            label=f"max F {curves['fmeasure'][best]:.3f} at {thresholds[best]}")
    ax.axhline(PAPER_BASNET_DUTS_TE["max_f"], color="tab:green", linestyle=":", label="paper max F (DUTS-TE)")
    ax.set(xlim=(0, 255), ylim=(0, 1.02), xlabel="threshold (0-255)", ylabel="F-measure",
           title=f"F-measure: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center")
    return _png_of(fig)


def sheet_size(rows: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a contact sheet with ``rows`` images."""
    return sheet.sheet_size(len(_COLUMNS), rows, TILE)


def _error_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Red where the prediction exceeds the binarised ground truth, cyan where it falls short."""
    target = np.where(gt > 128, 255, 0).astype(np.int16)
    diff = pred.astype(np.int16) - target
    extra, missed = np.clip(diff, 0, 255).astype(np.uint8), np.clip(-diff, 0, 255).astype(np.uint8)
    return np.stack([extra, missed, missed], axis=2)


def _input_image(uri: str | None, shape: tuple[int, int]) -> np.ndarray:
    if uri is not None:
        try:
            return decode_image(storage.read_bytes(uri))
        except (ImageDecodeError, OSError) as exc:
            logger.warning("contact sheet: cannot read %s: %s", uri, exc)
    return np.full((*shape, 3), 90, np.uint8)  # no image known: a plain grey cell


def _sheet_row(row: dict) -> tuple[list[np.ndarray], str]:
    pair = EvalPair(key=row["key"], pred=row["pred"], gt=row["gt"], image=row.get("image"))
    pred, gt, _ = load_pair(pair)
    caption = f"{row['key'][-40:]}   MAE {row['mae']:.4f}   max F {row['max_f']:.4f}"
    return [_input_image(pair.image, gt.shape), gt, pred, _error_map(pred, gt)], caption


def contact_sheet(rows: list[dict]) -> np.ndarray:
    """Image | ground truth | prediction | error for each row dict (as ``Scores.rows``).

    Returns:
        uint8 RGB array of :func:`sheet_size` ``(len(rows))``.
    """
    return sheet.compose(_COLUMNS, [_sheet_row(row) for row in rows], TILE)


def _extremes(rows: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """The ``n`` worst (highest MAE first) and best (lowest first) rows; ties broken by key."""
    ordered = sorted(rows, key=lambda row: (row["mae"], row["key"]))
    return ordered[::-1][:n], ordered[:n]


def _parquet(rows: list[dict]) -> bytes:
    import pandas as pd

    columns = ["key", "mae", "mae_as_written", "max_f", "height", "width", "resized", "gt_empty", "pred", "gt", "image"]
    columns += [key for key in QUALITY_COLUMNS if rows and key in rows[0]]
    buffer = io.BytesIO()
    pd.DataFrame(rows, columns=columns).to_parquet(buffer, index=False)
    return buffer.getvalue()


def _plot_title(dataset: str) -> str:
    """``/data/DUTS`` -> ``DUTS``; ``embedded sample, held-out images (/path)`` -> its words."""
    name = dataset.split(" (", 1)[0]
    return name.rstrip("/").rsplit("/", 1)[-1] or name


def write_report(evaluation: Evaluation, out: str, *, sheet_rows: int = 8) -> dict[str, str]:
    """Writes every output file under ``out`` (local or ``s3://``).

    Args:
        evaluation: The scored evaluation.
        out: Output folder.
        sheet_rows: Images in each contact sheet (fewer when fewer were scored).

    Returns:
        Output name (``"metrics.json"``, ...) -> URI.
    """
    title = _plot_title(evaluation.dataset)
    curves = evaluation.scores.metrics.curves()
    worst, best = _extremes(evaluation.scores.rows, sheet_rows)
    files = {
        "metrics.json": json.dumps(metrics_document(evaluation), indent=2).encode(),
        "metrics.md": _markdown(evaluation).encode(),
        "per_image.parquet": _parquet(evaluation.scores.rows),
        "pr_curve.png": plot_pr_curve(curves, title),
        "f_curve.png": plot_f_curve(curves, title),
        "worst.png": encode_png(contact_sheet(worst)),
        "best.png": encode_png(contact_sheet(best)),
    }
    written = {}
    for name, data in files.items():
        written[name] = storage.join(out, name)
        storage.write_bytes(written[name], data)
    logger.info("wrote %s to %s", ", ".join(files), out)
    return written
