"""The training job's options: one ``TrainConfig``, resolved from the data (sample or real)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from basnet.config import PRECISIONS, check_options, default_crop, option
from basnet.errors import ConfigError
from basnet.train.tracking import TRACKERS, check_tracking, default_tracking
from basnet.watchdog import DEFAULT_STALL_TIMEOUT_S

__all__ = ["TrainConfig", "SAMPLE_DEFAULTS", "DATA_DEFAULTS", "resolve_data"]

# What an option left unset means when training on the embedded sample (``--data`` not given):
# small enough to finish on 2 CPU cores in a few minutes.
SAMPLE_DEFAULTS = {"image_size": 64, "epochs": 3, "batch_size": 8,
                   "backbone_weights": "none"}
DATA_DEFAULTS = {"image_size": 256, "epochs": 100, "batch_size": 8, "backbone_weights": "imagenet"}


@dataclass
class TrainConfig:
    """Everything the training job needs; ``None`` means "resolved from the data"."""

    data: str | None = option(None, "DUTS-layout root (local, file:// or s3://); default: the embedded sample")
    storage: str | None = option(None, "where checkpoints go (local or s3://; shared storage on several "
                                     "nodes); default: $BASNET_STORAGE or ./runs")
    name: str = option("basnet", "run name; re-running with the same name resumes from its last checkpoint")
    epochs: int | None = option(None, "training epochs (default 100; 3 on the sample)", positive=True)
    batch_size: int | None = option(None, "global batch size, split equally across workers (default 8)",
                                    positive=True)
    image_size: int | None = option(None, "resize side before cropping, a multiple of 32 (default 256; 64 on "
                                          "the sample)", multiple_of=32)
    crop_size: int | None = option(None, "random-crop side, a multiple of 32 (default 7/8 of --image-size)",
                                   multiple_of=32)
    lr: float = option(1e-3, "Adam learning rate (the paper's 1e-3)", positive=True)
    weight_decay: float = option(0.0, "Adam weight decay")
    bce_weight: float = option(1.0, "weight of the BCE term of the hybrid loss")
    ssim_weight: float = option(1.0, "weight of the (1 - SSIM) term")
    iou_weight: float = option(1.0, "weight of the IoU term")
    num_workers: int | None = option(None, "training workers (default: one per GPU, or 1 on CPU)", positive=True)
    min_workers: int | None = option(None, "elastic training: go on with as few as this many workers "
                                         "when nodes are lost (default: --num-workers, not elastic)", positive=True)
    cpus_per_worker: float | None = option(None, "CPUs per training worker (default 1 with GPU; on CPU "
                                               "what leaves one CPU for Ray Data)")
    gpu: bool | None = option(None, "train on GPUs (default: if the cluster has any)")
    gpus_per_worker: float = option(1.0, "GPUs per training worker; a fraction shares a GPU between "
                                         "workers (they then talk over gloo, since NCCL refuses two ranks "
                                         "on one GPU)")
    precision: str = option("auto", "auto: bf16 autocast on GPUs that support it, fp16 with loss scaling "
                                  "on older GPUs, fp32 on CPU; or fp32, bf16, fp16", choices=PRECISIONS)
    channels_last: bool | None = option(None, "channels_last (NHWC) model and inputs (default: on GPUs)")
    compile: bool = option(False, "torch.compile the model (slower first steps, faster after)")
    sync_bn: str = option("auto", "synchronise BatchNorm statistics across workers; auto: with several "
                                "GPU workers of fewer than 8 images each", choices=("auto", "on", "off"))
    log_every: int = option(50, "rank 0 prints the loss, images/s and ETA every this many steps (0: never)",
                            at_least=0, at_least_means="(never)")
    tracking: str | None = option(None, "rank 0 logs the run to tensorboard (<storage>/<name>/tensorboard/), "
                                        "mlflow ($MLFLOW_TRACKING_URI, default ./mlruns) or none (default: "
                                        "tensorboard when installed)", choices=TRACKERS)
    verbose: bool = option(False, "show Ray's own INFO logs on the console")
    backbone_weights: str | None = option(None, "encoder init: imagenet, none or a torchvision resnet34 "
                                              "state-dict PATH (default imagenet; none on the sample)")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before the run fails",
                               at_least=-1, at_least_means="(unlimited)")
    stall_timeout: float = option(DEFAULT_STALL_TIMEOUT_S, "fail the run (exit 1, one line naming the stream and "
                                  "the cluster's state) when no training or validation batch arrives for this "
                                  "many seconds, the first included; a worker failure, so --max-failures "
                                  "restarts from the last checkpoint first (0: wait forever)",
                                  at_least=0, at_least_means="(wait forever)")
    skip_unpaired: bool = option(False, "skip images without a mask (and masks without an image) instead of failing")
    val_fraction: float = option(0.1, "held-out share for validation when the data has no DUTS-TE",
                                 between=(0, 1))
    eval_data: str | None = option(None, "after training, evaluate the best checkpoint on this data "
                                       "(a DUTS-layout root, or 'sample')")
    eval_out: str | None = option(None, "where the evaluation writes (default: <storage>/<name>/eval)")
    seed: int = option(0, "seed for the model init and the held-out split")

    def resolved(self) -> "TrainConfig":
        """Fills the ``None`` defaults from the data (sample or real) and checks the values."""
        cfg = dataclasses.replace(self)
        defaults = SAMPLE_DEFAULTS if cfg.data is None else DATA_DEFAULTS
        for key, value in defaults.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.storage is None:
            cfg.storage = os.environ.get("BASNET_STORAGE") or os.path.abspath("runs")
        if cfg.crop_size is None:
            cfg.crop_size = default_crop(cfg.image_size)
        if cfg.tracking is None:
            cfg.tracking = default_tracking()
        cfg.check()
        return cfg

    def check(self) -> None:
        check_options(self)
        if self.tracking:
            check_tracking(self.tracking)
        if self.crop_size and self.image_size and self.crop_size > self.image_size:
            raise ConfigError(f"--crop-size {self.crop_size} is larger than --image-size {self.image_size}")
        if self.min_workers and self.num_workers and self.min_workers > self.num_workers:
            raise ConfigError("--min-workers is larger than --num-workers")
        self.check_batch_split()
        if not 0 < self.gpus_per_worker <= 1:
            raise ConfigError(f"--gpus-per-worker must be 1 or a fraction of 1, got {self.gpus_per_worker}")

    def check_batch_split(self) -> None:
        """The global batch must split equally: a remainder would silently change it."""
        if self.batch_size and self.num_workers and self.batch_size % self.num_workers:
            lower = self.batch_size // self.num_workers * self.num_workers
            fix = f"--batch-size {lower or self.num_workers} or {lower + self.num_workers}"
            raise ConfigError(f"--batch-size {self.batch_size} does not split equally across "
                              f"{self.num_workers} workers: use {fix}, or another --num-workers")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_data(cfg: TrainConfig):
    """The pairs ``cfg`` trains and validates on (``basnet.data.discovery.Split``; the embedded
    sample without ``--data``). Jobs call it before Ray starts, so bad data is a one-line error."""
    from basnet.data.discovery import training_split

    return training_split(cfg.data, skip_unpaired=cfg.skip_unpaired, val_fraction=cfg.val_fraction, seed=cfg.seed)
