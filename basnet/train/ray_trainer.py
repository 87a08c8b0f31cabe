"""Data-parallel BASNet training with Ray Train: the per-worker loop and the driver that launches it.

The loop takes a plain dict (a ``TrainConfig`` as dict), so Ray Tune can search over that same
dict. Rank 0 prints one line per epoch and attaches the checkpoint; every rank reports (a barrier).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train import (
    CheckpointConfig,
    CheckpointUploadMode,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from basnet import storage
from basnet.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from basnet.data.discovery import Split
from basnet.data.ray_pipeline import training_dataset, validation_dataset
from basnet.loss import HybridLoss
from basnet.metrics import SODMetrics
from basnet.ray_errors import user_error
from basnet.ray_progress import report_for
from basnet.train.config import TrainConfig, resolve_data
from basnet.train.curves import CURVES_FILE, record_epoch
from basnet.train.ray_resources import check_shared_storage, resolve_resources
from basnet.train.tracking import Tracker, mlflow_uri, open_tracker
from basnet.train.distributed import epoch_metrics, gather_metrics, replica_digests, sync_buffers
from basnet.train.engine import StepLog, TrainingState, build_training_state, steps_per_epoch, train_epoch, validate
from basnet.transforms import random_crop_flip_batch
from basnet.watchdog import watched

logger = logging.getLogger(__name__)

__all__ = ["train_loop_per_worker", "build_trainer", "fit", "TrainOutcome", "checkpoint_uri"]


# ---------------------------------------------------------------- the per-worker loop


class _SplitBoth(DataConfig):
    """Splits "train" equally and "val" unequally, so each rank scores a disjoint part of the
    validation set and no image is dropped or counted twice."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        val = datasets.pop("val", None)
        output = super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        if val is not None:
            if val.name is None:  # named as DataConfig names "train": a stall report finds it by name
                val.set_name("val")
            for i, shard in enumerate(val.streaming_split(world_size, equal=False)):
                output[i]["val"] = shard
        return output


def _print(line: str) -> None:
    # sys.stdout.write, not logging: Ray forwards worker stdout to the driver and the job logs.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _epoch_line(m: dict) -> str:
    return (f"epoch {m['epoch']:>3}  train loss {m['train_loss']:.4f}  val MAE {m['val_mae']:.4f}  "
            f"val max F {m['val_max_f']:.4f}  {m['images_per_s']:.2f} img/s")


def _run_uri() -> str:
    """The run's folder (where the checkpoints go) as a URI our storage helper reads."""
    run = ray.train.get_context().get_storage()
    return ("s3://" if isinstance(run.storage_filesystem, pafs.S3FileSystem) else "") + run.experiment_fs_path


def _lr(state: TrainingState) -> float:
    return float(state.optimizer.param_groups[0]["lr"])


def _report(cfg: TrainConfig, m: dict, state: TrainingState, tracker: Tracker, *, with_checkpoint: bool) -> None:
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        _print(_epoch_line(m))
        try:  # pictures and logs must never cost the run its checkpoint
            record_epoch(_run_uri(), m)  # history.json and curves.png, beside the checkpoints
            tracker.epoch(m["epoch"], m, _lr(state))
        except Exception as exc:
            logger.warning("epoch %d: cannot write the curves or the tracking logs: %s", m["epoch"], exc)
    if not (with_checkpoint and rank == 0):
        ray.train.report(m)
        return
    # Written once, straight into the run's folder (local or S3), then handed to Ray as it is: a
    # temporary copy that Ray uploads again would write every ~1 GB checkpoint twice.
    run = ray.train.get_context().get_storage()
    checkpoint = ray.train.Checkpoint(path=f"{run.experiment_fs_path}/epoch_{m['epoch']:04d}",
                                      filesystem=run.storage_filesystem)
    m = {**m, "checkpoint": checkpoint_uri(checkpoint)}  # where this epoch's weights are, for Tune and callers
    save_checkpoint(m["checkpoint"], model_state=state.module.state_dict(), config=cfg.to_dict(),
                    epoch=m["epoch"], metrics=m, optimizer_state=state.optimizer.state_dict(),
                    scaler_state=state.scaler.state_dict() if state.scaler else None)
    ray.train.report(m, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def per_worker_batch(global_batch: int, world_size: int, planned_workers: int) -> int:
    """Each worker's share of the global batch. An elastic run on fewer workers than planned keeps
    the global batch by raising the share (rounding up when it does not split equally)."""
    share = math.ceil(global_batch / world_size)
    if world_size != planned_workers and ray.train.get_context().get_world_rank() == 0:
        _print(f"elastic: {world_size} of {planned_workers} workers: {share} images per worker "
               f"(was {global_batch // planned_workers}), a global batch of {share * world_size} "
               f"for --batch-size {global_batch}")
    return share


def _latest_checkpoint(device: torch.device) -> dict | None:
    """This run's last checkpoint, read in one piece (Ray's directory download streams small
    reads, slow on S3) through basnet.checkpoint, onto the loop's device."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    return load_checkpoint(storage.join(checkpoint_uri(ckpt), MODEL_FILE), map_location=device, whole=True)


SHUFFLE_BATCHES = 4  # the local shuffle buffer holds this many batches of rows


def _node_cpus() -> float:
    here = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == here), 1.0)


def _set_threads(device: torch.device, local_workers: int) -> int:
    """On CPU a worker's torch threads are its share of the node's cores, not of its reservation:
    Ray Data's decoding, which holds the rest of the reservation, is a few milliseconds an image
    against the model's hundreds, and a plain loop would use every core too."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: cuDNN's autotuned kernels pay off
        return torch.get_num_threads()
    threads = max(1, int(_node_cpus() // max(local_workers, 1)))
    torch.set_num_threads(threads)
    return threads


def train_loop_per_worker(loop_config: dict) -> dict:
    """Runs on every training worker: set up, resume, then train/validate/checkpoint each epoch.

    ``loop_config`` is ``{"config": TrainConfig as dict, "train_images": N, "mlflow_uri": the driver's
    MLflow tracking URI or None}``. Returns (rank 0's is
    ``Result.return_value``) the last epoch, every replica's digest and where the restored
    optimizer state lives.
    """
    cfg = TrainConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    _set_threads(device, ctx.get_local_world_size())
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    batch = per_worker_batch(cfg.batch_size, world, cfg.num_workers or world)
    state = build_training_state(cfg, device, world_size=world, per_worker_batch=batch,
                                 wrap=ray.train.torch.prepare_model, checkpoint=_latest_checkpoint(device))
    loss_fn = HybridLoss(bce_weight=cfg.bce_weight, ssim_weight=cfg.ssim_weight, iou_weight=cfg.iou_weight)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    steps = steps_per_epoch(int(loop_config.get("train_images") or 0), world, batch) or None

    def watch(stream: str, dataset: str, batches):
        """The batches of one pass, failing the run with one line when none comes for --stall-timeout."""
        return watched(batches, stream=stream, timeout_s=cfg.stall_timeout, report=report_for(dataset))

    def val_metrics() -> SODMetrics:
        # The bare module: DDP's forward is a collective (it broadcasts buffers), and ranks may
        # hold different numbers of validation batches.
        batches = watch("validation", "val", val_shard.iter_batches(batch_size=batch))
        return gather_metrics(validate(state.module, batches, device=device, precision=state.precision,
                                       memory_format=state.memory_format))

    def global_step(epoch: int, step: int) -> int:
        return (epoch - 1) * steps + step if steps else epoch * 1_000_000 + step

    tracker = open_tracker(cfg.tracking or "none", run_uri=_run_uri() if rank == 0 else "", name=cfg.name, rank=rank,
                           tracking_uri=loop_config.get("mlflow_uri"),
                           resume_step=global_step(state.epoch + 1, 1) if state.epoch else None)
    tracker.config(cfg.to_dict())

    def on_log(log: StepLog) -> None:
        _print(log.line())
        tracker.step(global_step(log.epoch, log.step), log.loss, _lr(state))

    if state.epoch == 0:  # the untrained model's score, the baseline every later epoch is judged by
        _report(cfg, epoch_metrics(0, None, val_metrics(), device), state, tracker, with_checkpoint=False)
    elif state.epoch >= cfg.epochs:
        # Everything was done before a restart (a search killed after this run's last checkpoint
        # but before it noted the end): report the last epoch again, so the caller sees its result.
        ray.train.report(state.metrics)
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            rng = np.random.default_rng([cfg.seed, epoch, rank])  # new crops every epoch, the same on a re-run
            # drop_last: a last batch of one image would give BatchNorm a single value per channel.
            rows = watch("train", "train", train_shard.iter_batches(
                batch_size=batch, prefetch_batches=2, drop_last=True, local_shuffle_seed=cfg.seed + epoch,
                local_shuffle_buffer_size=SHUFFLE_BATCHES * batch))
            batches = (random_crop_flip_batch(b, cfg.crop_size, rng) for b in rows)
            stats = train_epoch(state.model, batches, loss_fn, state.optimizer, device=device,
                                precision=state.precision, scaler=state.scaler, memory_format=state.memory_format,
                                epoch=epoch, log_every=cfg.log_every, steps=steps,
                                on_log=on_log if rank == 0 else None)
            sync_buffers(state.module)
            _report(cfg, epoch_metrics(epoch, stats, val_metrics(), device), state, tracker, with_checkpoint=True)
    finally:
        tracker.close()
    return {"epoch": max(state.epoch, cfg.epochs), "replica_digests": replica_digests(state.module),
            "optimizer_state_devices": sorted({str(v.device) for s in state.optimizer.state.values()
                                               for v in s.values() if torch.is_tensor(v) and v.dim() > 0})}


# ---------------------------------------------------------------- the driver


@dataclass
class TrainOutcome:
    best_checkpoint: str | None
    best_metrics: dict
    epochs_run: int
    split: Split
    loop_result: dict = field(default_factory=dict)  # rank 0's return value (see train_loop_per_worker)


def checkpoint_uri(ckpt: ray.train.Checkpoint) -> str:
    """A Ray checkpoint's location as a URI our storage helper reads."""
    if isinstance(ckpt.filesystem, pafs.S3FileSystem):
        return "s3://" + ckpt.path
    return ckpt.path


def build_trainer(cfg: TrainConfig, split: Split, *, callbacks: list | None = None) -> TorchTrainer:
    fs, path = storage.filesystem(cfg.storage)
    workers = cfg.num_workers
    if cfg.min_workers and cfg.min_workers < cfg.num_workers:
        workers = (cfg.min_workers, cfg.num_workers)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpu else {})}
    # NCCL refuses two ranks on one GPU: workers that share a GPU talk over gloo (CUDA tensors too).
    backend = "gloo" if cfg.gpu and cfg.gpus_per_worker < 1 else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "train_images": len(split.train),
                           "mlflow_uri": mlflow_uri() if cfg.tracking == "mlflow" else None},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(cfg.gpu), resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_mae",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks or None,
            # Ray Train logs every report at INFO ("Reporting training result ..."): the job prints its own.
            logging_config=LoggingConfig(log_level="INFO" if cfg.verbose else "WARNING"),
        ),
        datasets={"train": training_dataset(split.train, image_size=cfg.image_size, seed=cfg.seed),
                  "val": validation_dataset(split.val, image_size=cfg.image_size)},
        # preserve_order: the seeded block order reaches the loop as it is, so a re-run sees the same batches.
        dataset_config=_SplitBoth(datasets_to_split=["train"],
                                  execution_options={"train": ray.data.ExecutionOptions(preserve_order=True)}),
    )


@contextlib.contextmanager
def _own_sigint_handler():
    """Ray Train installs a Ctrl-C handler that aborts its run and leaves it installed after ``fit``:
    the handler holds the run's controller, which then outlives the run with its dataset actors (about
    1.4 GB of processes, until the next fit replaces it), and a Ctrl-C during the evaluation that
    follows training would exit 0. The caller's handler is put back when ``fit`` ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray Train installs none outside the main thread (in a Tune trial)
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def best_of(result: ray.train.Result) -> tuple[str | None, dict]:
    scored = [(m, c) for c, m in (result.best_checkpoints or []) if m.get("val_mae") == m.get("val_mae")]
    if not scored:
        return None, {}
    metrics, ckpt = min(scored, key=lambda mc: mc[0]["val_mae"])
    return checkpoint_uri(ckpt), metrics


def fit(cfg: TrainConfig, *, split: Split | None = None, callbacks: list | None = None) -> TrainOutcome:
    """Trains per ``cfg`` (already resolved) on the running Ray cluster; prints the best checkpoint.

    ``split`` is the data :func:`resolve_data` found (jobs find it before Ray starts); found here if None.
    """
    cfg = resolve_resources(cfg)
    check_shared_storage(cfg)
    split = split or resolve_data(cfg)
    logger.info("training on %d pairs, validating on %d (%s); %d worker(s), gpu=%s",
                len(split.train), len(split.val), split.val_source, cfg.num_workers, cfg.gpu)
    try:
        with _own_sigint_handler():
            result = build_trainer(cfg, split, callbacks=callbacks).fit()
    except ray.train.TrainingFailedError as exc:
        if (error := user_error(exc)) is not None:  # a worker's stall, a user's error: one line
            raise error from None
        raise
    uri, metrics = best_of(result)
    epochs = int((result.metrics or {}).get("epoch", 0))
    if uri:
        print(f"best checkpoint: {uri}  (epoch {metrics['epoch']}, val MAE {metrics['val_mae']:.4f}, "
              f"val max F {metrics['val_max_f']:.4f})", flush=True)
        print(f"curves: {uri.rsplit('/', 1)[0]}/{CURVES_FILE}", flush=True)
    return TrainOutcome(best_checkpoint=uri, best_metrics=metrics, epochs_run=epochs, split=split,
                        loop_result=result.return_value or {})
