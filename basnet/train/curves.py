"""A run's history and its picture: ``history.json`` and ``curves.png`` beside the checkpoints.

Rank 0 calls :func:`record_epoch` once per epoch, the untrained epoch 0 included. The history
lives in the run's folder (local or ``s3://``), so a resumed run, in a fresh process, continues it:
an epoch that is run again (after a crash between its checkpoint and the next) replaces its row
and drops the rows after it. No Ray, no torch.
"""

from __future__ import annotations

import io
import json
import math

from basnet import storage

__all__ = ["HISTORY_FILE", "CURVES_FILE", "record_epoch", "read_history", "plot_curves", "CURVES_SIZE"]

HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"
CURVES_SIZE = (900, 380)  # pixels (width, height)
_DPI = 100
_KEYS = ("epoch", "train_loss", "val_mae", "val_max_f", "images_per_s")


def read_history(run_uri: str) -> list[dict]:
    uri = storage.join(run_uri, HISTORY_FILE)
    if not storage.exists(uri):
        return []
    return json.loads(storage.read_bytes(uri))


def record_epoch(run_uri: str, metrics: dict) -> list[dict]:
    """Adds an epoch's figures to the run's history and redraws ``curves.png``; returns the history."""
    row = {k: _number(metrics.get(k)) for k in _KEYS}
    history = [r for r in read_history(run_uri) if r["epoch"] < row["epoch"]] + [row]
    storage.write_bytes(storage.join(run_uri, HISTORY_FILE), json.dumps(history, indent=1).encode())
    storage.write_bytes(storage.join(run_uri, CURVES_FILE), plot_curves(history))
    return history


def _number(value) -> float | int | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None  # JSON has no NaN: epoch 0 has no training loss
    return int(value) if value.is_integer() and abs(value) < 1e15 else value


def plot_curves(history: list[dict]) -> bytes:
    """Training loss (left) and validation MAE and max F (right) against the epoch; PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(CURVES_SIZE[0] / _DPI, CURVES_SIZE[1] / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, val_ax = fig.subplots(1, 2)
    trained = [r for r in history if r["train_loss"] is not None]
    loss_ax.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], "o-", color="tab:blue",
                 label="train loss (hybrid BCE + SSIM + IoU, 8 outputs)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Training loss")
    for key, label, color in (("val_mae", "val MAE (lower is better)", "tab:red"),
                              ("val_max_f", "val max F (higher is better)", "tab:green")):
        points = [r for r in history if r[key] is not None]
        val_ax.plot([r["epoch"] for r in points], [r[key] for r in points], "o-", color=color, label=label)
    if history and history[0]["epoch"] == 0:
        val_ax.axvline(0, color="tab:gray", linestyle=":", label="epoch 0: untrained")
    val_ax.set(xlabel="epoch", ylim=(0, 1.02), title="Validation")
    for ax in (loss_ax, val_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=-0.3 if history and history[0]["epoch"] == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
