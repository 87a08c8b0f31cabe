"""What a search leaves: the trials table (best first), trials.csv, best.yaml and best_checkpoint.txt."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import yaml

from basnet import storage
from basnet.config import plain
from basnet.train.config import TrainConfig
from basnet.tune.space import trial_config

__all__ = ["METRIC", "SearchOutcome", "trial_rows", "format_table", "best_train_config", "write_outputs",
           "print_summary"]

METRIC = "val_mae"


@dataclass
class SearchOutcome:
    """What a search leaves: the trials table (best first) and the best trial's files."""

    experiment: str
    keys: list[str]
    rows: list[dict]
    best_config: str | None = None
    best_checkpoint: str | None = None

    @property
    def best(self) -> dict | None:
        return self.rows[0] if self.rows and self.rows[0]["checkpoint"] else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _trial_row(trial: Any, reports: list[dict], keys: list[str], epochs: int) -> dict:
    """One trial: its sampled values, best checkpointed epoch, epochs run and status.

    A checkpointed epoch's report carries its checkpoint's URI (``checkpoint``, from the training loop).
    """
    scored = [r for r in reports if isinstance(r.get("checkpoint"), str) and _finite(r.get(METRIC))]
    best = min(scored, key=lambda r: r[METRIC]) if scored else {}
    epochs_run = max((int(r["epoch"]) for r in reports if _finite(r.get("epoch"))), default=0)
    status = {"ERROR": "error", "TERMINATED": "done" if epochs_run >= epochs else "stopped"}.get(
        trial.status, trial.status.lower())
    return {
        "trial_id": trial.trial_id,
        **{k: plain(trial.config.get(k)) for k in keys},
        "val_mae": best.get(METRIC), "val_max_f": best.get("val_max_f"),
        "best_epoch": int(best["epoch"]) if best else None, "epochs_run": epochs_run, "status": status,
        "checkpoint": best.get("checkpoint"),
    }


def trial_rows(analysis: Any, keys: list[str], epochs: int) -> list[dict]:
    """Rows of the trials table from a Tune ``ExperimentAnalysis``, best validation MAE first.

    "stopped" is a trial the scheduler ended before ``epochs``; "error" one that failed.
    """
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows.append(_trial_row(trial, frame.to_dict("records") if frame is not None else [], keys, epochs))
    return sorted(rows, key=lambda r: (not _finite(r["val_mae"]), r["val_mae"] or 0.0, r["trial_id"]))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 0.01 <= abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict], keys: list[str]) -> str:
    """The trials table as fixed-width text (checkpoint URIs are in the CSV)."""
    columns = ["trial_id", *keys, "val_mae", "val_max_f", "epochs_run", "status"]
    cells = [columns] + [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def best_train_config(base: TrainConfig, sampled: dict, *, name: str) -> dict:
    """The best trial's training config for ``jobs/train.py --config``: its values, a new run
    name in the search's storage, and resources left for the training job to size."""
    cfg = trial_config(base, sampled, name=name, storage_uri=base.storage)
    return {**cfg.to_dict(), "num_workers": None, "min_workers": None, "cpus_per_worker": None, "gpu": None,
            "gpus_per_worker": 1.0}


def write_outputs(outcome: SearchOutcome, base: TrainConfig, best_sampled: dict | None) -> None:
    """Writes trials.csv, and for the best trial best.yaml and best_checkpoint.txt."""
    storage.write_bytes(storage.join(outcome.experiment, "trials.csv"), _csv(outcome.rows))
    best = outcome.best
    if best is None or best_sampled is None:
        return
    config = best_train_config(base, best_sampled, name=f"{base.name}-best")
    outcome.best_config = storage.join(outcome.experiment, "best.yaml")
    header = (f"# best trial {best['trial_id']} of the search {outcome.experiment}: val MAE "
              f"{best['val_mae']:.4f}, val max F {best['val_max_f']:.4f} (epoch {best['best_epoch']})\n"
              f"# best checkpoint: {best['checkpoint']}\n"
              f"# train with it: python jobs/train.py --config {outcome.best_config} [--epochs N]\n")
    outcome.best_checkpoint = best["checkpoint"]
    storage.write_bytes(outcome.best_config, (header + yaml.safe_dump(config, sort_keys=False)).encode())
    storage.write_bytes(storage.join(outcome.experiment, "best_checkpoint.txt"), f"{best['checkpoint']}\n".encode())


def print_summary(outcome: SearchOutcome) -> None:
    print(format_table(outcome.rows, outcome.keys), flush=True)
    print(f"trials table: {storage.join(outcome.experiment, 'trials.csv')}", flush=True)
    if outcome.best_config:
        print(f"best trial: {outcome.best['trial_id']}  val MAE {outcome.best['val_mae']:.4f}  "
              f"val max F {outcome.best['val_max_f']:.4f}", flush=True)
        print(f"best checkpoint: {outcome.best_checkpoint}", flush=True)
        print(f"best config: {outcome.best_config}", flush=True)
    if any(row["status"] not in ("done", "stopped", "error") for row in outcome.rows):
        print("the search was interrupted: run the same command again to finish it", flush=True)
