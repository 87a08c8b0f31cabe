"""Tracked runs: rank 0 logs to TensorBoard or MLflow itself (Ray Train V2's logger callbacks are Tune's).

``--tracking tensorboard`` (the default when the ``tensorboard`` package is installed) writes event
files to ``<storage>/<name>/tensorboard/``: straight there on local storage; on ``s3://`` into a local
folder copied up after every epoch. ``--tracking mlflow`` logs to ``$MLFLOW_TRACKING_URI`` (default:
``./mlruns`` in the folder the job was started from), one MLflow run named after ``--name``, whose
id is kept in the run's folder so a resumed run goes on logging into the same MLflow run.

Logged: the resolved config (once per run), the step loss and learning rate at ``--log-every``,
and every epoch's train loss, val MAE, val max F, images/s and learning rate. No Ray here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile

from basnet import storage
from basnet.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["TRACKERS", "default_tracking", "check_tracking", "open_tracker", "mlflow_uri", "Tracker",
           "TENSORBOARD_DIR", "MLFLOW_RUN_FILE"]

TRACKERS = ("tensorboard", "mlflow", "none")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
EPOCH_KEYS = {"train_loss": "epoch/train_loss", "val_mae": "epoch/val_mae", "val_max_f": "epoch/val_max_f",
              "images_per_s": "epoch/images_per_s"}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def default_tracking() -> str:
    return "tensorboard" if _installed("tensorboard") else "none"


def check_tracking(kind: str) -> None:
    """Raises ConfigError for an unknown tracker or one whose package is missing (before Ray starts)."""
    if kind not in TRACKERS:
        raise ConfigError(f"--tracking {kind!r} is not one of {', '.join(TRACKERS)}")
    package = _PACKAGES.get(kind)
    if package and not _installed(package):
        raise ConfigError(f"--tracking {kind} needs the {package} package: pip install {package} "
                          "(or --tracking none)")


class Tracker:
    """Does nothing: ``--tracking none``, and every rank but 0."""

    def config(self, config: dict) -> None: ...

    def step(self, step: int, loss: float, lr: float) -> None: ...

    def epoch(self, epoch: int, metrics: dict, lr: float) -> None: ...

    def close(self) -> None: ...


def _finite(metrics: dict) -> dict[str, float]:
    out = {}
    for key, name in EPOCH_KEYS.items():
        value = metrics.get(key)
        if value is not None and not math.isnan(value):  # NaN: epoch 0 has no training loss
            out[name] = float(value)
    return out


class TensorBoardTracker(Tracker):
    def __init__(self, run_uri: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_uri, TENSORBOARD_DIR) if storage.is_s3(run_uri) else None
        self.local = tempfile.mkdtemp(prefix="basnet-tb-") if self.remote else storage.join(run_uri, TENSORBOARD_DIR)
        # A new event file per process: TensorBoard reads them all. A resumed run logs again the steps
        # after its checkpoint; purge_step hides the earlier run's events from that step on.
        self.writer = SummaryWriter(self.local, purge_step=purge_step)

    def config(self, config: dict) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in config.items())  # indented: TensorBoard renders markdown
        self.writer.add_text("config", text, 0)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, epoch: int, metrics: dict, lr: float) -> None:
        for name, value in {**_finite(metrics), "epoch/lr": lr}.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.remote:
            for name in os.listdir(self.local):
                with open(os.path.join(self.local, name), "rb") as f:
                    storage.write_bytes(storage.join(self.remote, name), f.read())

    def close(self) -> None:
        """Closes the event file; on S3, uploads what came after the last epoch and drops the local copy."""
        self.writer.close()
        if self.remote:
            self._upload()
            shutil.rmtree(self.local, ignore_errors=True)


def mlflow_uri() -> str:
    """Where MLflow runs go, decided on the driver (a worker's folder is not the user's):
    ``$MLFLOW_TRACKING_URI``, else ``./mlruns`` where the job was started."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.abspath("mlruns")


class MLflowTracker(Tracker):
    def __init__(self, run_uri: str, name: str, tracking_uri: str) -> None:
        import mlflow

        if tracking_uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a local mlruns/
            # folder is still what a run without a tracking server wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(tracking_uri)
        self.mlflow = mlflow
        self.record = storage.join(run_uri, MLFLOW_RUN_FILE)
        known = json.loads(storage.read_bytes(self.record)) if storage.exists(self.record) else None
        self.run = None
        if known and known.get("tracking_uri") == mlflow.get_tracking_uri():
            try:
                self.run = mlflow.start_run(run_id=known["run_id"])  # a resumed run continues its MLflow run
            except Exception as exc:  # e.g. a local store on another node: log on, in a new MLflow run
                logger.warning("cannot continue MLflow run %s (%s): starting a new one", known["run_id"], exc)
        if self.run is None:
            mlflow.set_experiment("basnet-ray")
            self.run = mlflow.start_run(run_name=name)
            storage.write_bytes(self.record, json.dumps({"run_id": self.run.info.run_id,
                                                         "tracking_uri": mlflow.get_tracking_uri()}).encode())

    def config(self, config: dict) -> None:
        logged = self.mlflow.get_run(self.run.info.run_id).data.params
        params = {k: str(v)[:500] for k, v in config.items() if k not in logged}  # params cannot change
        if params:
            self.mlflow.log_params(params)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.mlflow.log_metrics({"step/loss": loss, "step/lr": lr}, step=step)

    def epoch(self, epoch: int, metrics: dict, lr: float) -> None:
        self.mlflow.log_metrics({**_finite(metrics), "epoch/lr": lr}, step=epoch)

    def close(self) -> None:
        self.mlflow.end_run()


def open_tracker(kind: str, *, run_uri: str, name: str, rank: int, tracking_uri: str | None = None,
                 resume_step: int | None = None) -> Tracker:
    """The run's tracker on rank 0 (a do-nothing one elsewhere and for ``none``); ``resume_step``, the
    first step a resumed run logs, replaces what an earlier run logged from there on."""
    if rank != 0 or kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_uri, purge_step=resume_step)
    if kind == "mlflow":
        return MLflowTracker(run_uri, name, tracking_uri or mlflow_uri())
    raise ConfigError(f"--tracking {kind!r} is not one of {', '.join(TRACKERS)}")
