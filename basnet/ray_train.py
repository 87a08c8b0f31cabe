"""Data-parallel BASNet training with Ray Train: the per-worker loop and the driver that launches it.

The loop takes a plain dict (a ``TrainConfig`` as dict), so Ray Tune can search over that same
dict. Rank 0 prints one line per epoch and attaches the checkpoint; every rank reports (a barrier).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
import tempfile
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from basnet import storage
from basnet.checkpoint import save_checkpoint
from basnet.cli import UsageError
from basnet.config import TrainConfig
from basnet.data import Split, discover
from basnet.engine import EpochStats, precision_for, train_epoch, validate
from basnet.loss import HybridLoss
from basnet.metrics import SODMetrics
from basnet.model import BASNet
from basnet.ray_data import training_dataset, validation_dataset
from basnet.sample import ensure_sample

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
            for i, shard in enumerate(val.streaming_split(world_size, equal=False)):
                output[i]["val"] = shard
        return output


def _all_sum(values: list[float]) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _gather_metrics(local: SODMetrics) -> SODMetrics:
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged = SODMetrics()
    for part in parts:
        merged.merge(part)
    return merged


def _sync_buffers(model: torch.nn.Module) -> None:
    """BatchNorm running stats drift apart on each rank's data: take rank 0's, so every rank
    (and the checkpoint) holds the same model."""
    if dist.is_available() and dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def _restore(model, optimizer, scaler) -> tuple[int, dict]:
    """Loads the last checkpoint of this run, if any; returns (epoch done, its metrics)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, {}
    # One read of the whole file: Ray's directory download streams in small reads, slow on S3.
    with ckpt.filesystem.open_input_file(ckpt.path.rstrip("/") + "/model.pt") as f:
        payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    if payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    return int(payload["epoch"]), dict(payload.get("metrics") or {})


def _epoch_metrics(epoch: int, stats: EpochStats | None, val: SODMetrics) -> dict:
    scores = val.compute() if len(val) else {"mae": float("nan"), "max_f": float("nan")}
    images, seconds = _all_sum([stats.images, stats.seconds])[0:2] if stats else (0, 0.0)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {
        "epoch": epoch,
        "train_loss": stats.loss if stats else float("nan"),
        "val_mae": scores["mae"],
        "val_max_f": scores["max_f"],
        "val_images": len(val),
        "images_per_s": images / (seconds / world) if seconds else 0.0,
    }


def _print_epoch(m: dict) -> None:
    # sys.stdout.write, not logging: Ray forwards worker stdout to the driver and the job logs.
    sys.stdout.write(f"epoch {m['epoch']:>3}  train loss {m['train_loss']:.4f}  val MAE {m['val_mae']:.4f}  "
                     f"val max F {m['val_max_f']:.4f}  {m['images_per_s']:.2f} img/s\n")
    sys.stdout.flush()


def _report(cfg: TrainConfig, m: dict, model, optimizer, scaler, *, with_checkpoint: bool) -> None:
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        _print_epoch(m)
    if not (with_checkpoint and rank == 0):
        ray.train.report(m)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model_state=_unwrap(model).state_dict(), config=cfg.to_dict(), epoch=m["epoch"],
                        metrics=m, optimizer_state=optimizer.state_dict(),
                        scaler_state=scaler.state_dict() if scaler else None)
        ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{m['epoch']:04d}")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _replica_digests(model: torch.nn.Module) -> list[str]:
    """A hash of every parameter and buffer, from every rank: equal when the replicas agree."""
    h = hashlib.sha256()
    for name, tensor in _unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if not (dist.is_available() and dist.is_initialized()):
        return [h.hexdigest()]
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return digests


def train_loop_per_worker(loop_config: dict) -> dict:
    """Runs on every training worker: build, resume, then train/validate/checkpoint each epoch.

    Returns (rank 0's is ``Result.return_value``) the last epoch and every replica's digest.
    """
    cfg = TrainConfig(**loop_config)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and cfg.cpus_per_worker:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    backbone = None if cfg.backbone_weights in (None, "none") else cfg.backbone_weights
    model = BASNet(backbone_weights=backbone)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay)
    precision = precision_for(device)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    start_epoch, _ = _restore(model, optimizer, scaler)
    model = ray.train.torch.prepare_model(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = HybridLoss(bce_weight=cfg.bce_weight, ssim_weight=cfg.ssim_weight, iou_weight=cfg.iou_weight)
    per_worker_batch = max(1, cfg.batch_size // ctx.get_world_size())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def val_metrics() -> SODMetrics:
        # The unwrapped module: DDP's forward is a collective (it broadcasts buffers), and ranks
        # may hold different numbers of validation batches.
        return _gather_metrics(validate(_unwrap(model), val_shard.iter_batches(batch_size=per_worker_batch),
                                        device=device, precision=precision))

    if start_epoch == 0:  # the untrained model's score, the baseline every later epoch is judged by
        _report(cfg, _epoch_metrics(0, None, val_metrics()), model, optimizer, scaler, with_checkpoint=False)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        batches = train_shard.iter_torch_batches(batch_size=per_worker_batch, prefetch_batches=2,
                                                 dtypes=torch.uint8)
        stats = train_epoch(model, batches, loss_fn, optimizer, device=device, precision=precision, scaler=scaler)
        _sync_buffers(model)
        m = _epoch_metrics(epoch, stats, val_metrics())
        _report(cfg, m, model, optimizer, scaler, with_checkpoint=True)
    return {"epoch": max(start_epoch, cfg.epochs), "replica_digests": _replica_digests(model)}


# ---------------------------------------------------------------- the driver


@dataclass
class TrainOutcome:
    best_checkpoint: str | None
    best_metrics: dict
    epochs_run: int
    split: Split


def checkpoint_uri(ckpt: ray.train.Checkpoint) -> str:
    """A Ray checkpoint's location as a URI our storage helper reads."""
    if isinstance(ckpt.filesystem, pafs.S3FileSystem):
        return "s3://" + ckpt.path
    return ckpt.path


def _cluster_cpus_gpus() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


def resolve_resources(cfg: TrainConfig) -> TrainConfig:
    """Fills GPU use, worker count and CPUs per worker from what the cluster has."""
    cpus, gpus = _cluster_cpus_gpus()
    if cfg.gpu is None:
        cfg.gpu = gpus > 0
    if cfg.gpu and gpus == 0:
        raise UsageError("--gpu given but the Ray cluster has no GPUs: drop --gpu or add GPU nodes")
    if cfg.num_workers is None:
        cfg.num_workers = max(1, int(gpus)) if cfg.gpu else 1
    if cfg.cpus_per_worker is None:
        # On CPU, leave one CPU for Ray Data's decoding; two 1-CPU workers on 2 CPUs starve it.
        spare = max(cpus - 1, 0.5 * cfg.num_workers)
        cfg.cpus_per_worker = 1.0 if cfg.gpu else max(0.5, int(2 * spare / cfg.num_workers) / 2)
    return cfg


def check_shared_storage(cfg: TrainConfig) -> None:
    """Several machines cannot share checkpoints through one machine's local disk."""
    if storage.is_s3(cfg.storage) or os.environ.get("BASNET_STORAGE_IS_SHARED"):
        return
    fix = "pass --storage s3://bucket/prefix (or a shared mount and set BASNET_STORAGE_IS_SHARED=1)"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    addresses = {n["NodeManagerAddress"] for n in nodes}
    if len(addresses) > 1:
        raise UsageError(f"--storage {cfg.storage} is a local path but the cluster has {len(addresses)} "
                         f"machines: {fix}")
    # An autoscaling cluster may show only its head now; if the workers cannot run here, they
    # will run on machines that come later and write to their own disks.
    here = next((n for n in nodes if n["NodeID"] == ray.get_runtime_context().get_node_id()), None)
    resources = here["Resources"] if here else {}
    if resources.get("CPU", 0) < cfg.cpus_per_worker or (cfg.gpu and resources.get("GPU", 0) < 1):
        raise UsageError(f"--storage {cfg.storage} is a local path but the training workers cannot run "
                         f"on this machine, so they would write elsewhere: {fix}")


def resolve_data(cfg: TrainConfig) -> Split:
    root = cfg.data if cfg.data is not None else ensure_sample()
    return discover(root, skip_unpaired=cfg.skip_unpaired, val_fraction=cfg.val_fraction, seed=cfg.seed)


def build_trainer(cfg: TrainConfig, split: Split, *, callbacks: list | None = None) -> TorchTrainer:
    fs, path = storage.filesystem(cfg.storage)
    workers = cfg.num_workers
    if cfg.min_workers and cfg.min_workers < cfg.num_workers:
        workers = (cfg.min_workers, cfg.num_workers)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(cfg.gpu), resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_mae",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks or None,
        ),
        datasets={"train": training_dataset(split.train, image_size=cfg.image_size, crop_size=cfg.crop_size),
                  "val": validation_dataset(split.val, image_size=cfg.image_size)},
        dataset_config=_SplitBoth(datasets_to_split=["train"]),
    )


def best_of(result: ray.train.Result) -> tuple[str | None, dict]:
    scored = [(m, c) for c, m in (result.best_checkpoints or []) if m.get("val_mae") == m.get("val_mae")]
    if not scored:
        return None, {}
    metrics, ckpt = min(scored, key=lambda mc: mc[0]["val_mae"])
    return checkpoint_uri(ckpt), metrics


def fit(cfg: TrainConfig, *, callbacks: list | None = None) -> TrainOutcome:
    """Trains per ``cfg`` (already resolved) on the running Ray cluster; prints the best checkpoint."""
    cfg = resolve_resources(cfg)
    check_shared_storage(cfg)
    split = resolve_data(cfg)
    logger.info("training on %d pairs, validating on %d (%s); %d worker(s), gpu=%s",
                len(split.train), len(split.val), split.val_source, cfg.num_workers, cfg.gpu)
    result = build_trainer(cfg, split, callbacks=callbacks).fit()
    uri, metrics = best_of(result)
    epochs = int((result.metrics or {}).get("epoch", 0))
    if uri:
        print(f"best checkpoint: {uri}  (epoch {metrics['epoch']}, val MAE {metrics['val_mae']:.4f}, "
              f"val max F {metrics['val_max_f']:.4f})", flush=True)
    return TrainOutcome(best_checkpoint=uri, best_metrics=metrics, epochs_run=epochs, split=split)
