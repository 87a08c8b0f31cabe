"""One config dataclass per concern, a YAML file as argparse defaults, flags override the file.

The dataclasses are plain data: jobs turn them into dicts only at the Ray boundary, and the
resolved config is saved beside every checkpoint and every batch-inference output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from basnet.errors import ConfigError

__all__ = ["ConfigError", "option", "TrainConfig", "build_parser", "parse_config", "load_yaml", "SAMPLE_DEFAULTS"]

T = TypeVar("T")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose ``help`` (and argparse extras such as ``choices``) build its flag."""
    return field(default=default, metadata={"help": help, **extra})


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # --precision of every job; basnet.device says what each means

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
    epochs: int | None = option(None, "training epochs (default 100; 3 on the sample)")
    batch_size: int | None = option(None, "global batch size, split across workers (default 8)")
    image_size: int | None = option(None, "resize side before cropping, a multiple of 32 (default 256; 64 on the sample)")
    crop_size: int | None = option(None, "random-crop side, a multiple of 32 (default 7/8 of --image-size)")
    lr: float = option(1e-3, "Adam learning rate (the paper's 1e-3)")
    weight_decay: float = option(0.0, "Adam weight decay")
    bce_weight: float = option(1.0, "weight of the BCE term of the hybrid loss")
    ssim_weight: float = option(1.0, "weight of the (1 - SSIM) term")
    iou_weight: float = option(1.0, "weight of the IoU term")
    num_workers: int | None = option(None, "training workers (default: one per GPU, or 1 on CPU)")
    min_workers: int | None = option(None, "elastic training: go on with as few as this many workers "
                                         "when nodes are lost (default: --num-workers, not elastic)")
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
    log_every: int = option(50, "rank 0 prints the loss, images/s and ETA every this many steps (0: never)")
    verbose: bool = option(False, "show Ray's own INFO logs on the console")
    backbone_weights: str | None = option(None, "encoder init: imagenet, none or a torchvision resnet34 "
                                              "state-dict PATH (default imagenet; none on the sample)")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before the run fails")
    skip_unpaired: bool = option(False, "skip images without a mask (and masks without an image) instead of failing")
    val_fraction: float = option(0.1, "held-out share for validation when the data has no DUTS-TE")
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
            cfg.crop_size = max(32, round(cfg.image_size * 7 / 8 / 32) * 32)
        cfg.check()
        return cfg

    def check(self) -> None:
        for key in ("image_size", "crop_size"):
            value = getattr(self, key)
            if value is not None and (value < 32 or value % 32):
                raise ConfigError(f"--{key.replace('_', '-')} {value} is not a multiple of 32 (>= 32): "
                                  "BASNet downsamples by 32")
        if self.crop_size and self.image_size and self.crop_size > self.image_size:
            raise ConfigError(f"--crop-size {self.crop_size} is larger than --image-size {self.image_size}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                    "num_workers": self.num_workers, "min_workers": self.min_workers}
        for key, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {value}")
        if self.min_workers and self.num_workers and self.min_workers > self.num_workers:
            raise ConfigError("--min-workers is larger than --num-workers")
        self.check_batch_split()
        if not 0 < self.gpus_per_worker <= 1 and not (self.gpus_per_worker > 1 and self.gpus_per_worker.is_integer()):
            raise ConfigError(f"--gpus-per-worker must be a fraction in (0, 1] or a whole number, got {self.gpus_per_worker}")
        if self.log_every < 0:
            raise ConfigError(f"--log-every must be 0 (never) or more, got {self.log_every}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.max_failures < -1:
            raise ConfigError("--max-failures must be -1 (unlimited) or more")

    def check_batch_split(self) -> None:
        """The global batch must split equally: a remainder would silently change it."""
        if self.batch_size and self.num_workers and self.batch_size % self.num_workers:
            lower = self.batch_size // self.num_workers * self.num_workers
            fix = f"--batch-size {lower or self.num_workers} or {lower + self.num_workers}"
            raise ConfigError(f"--batch-size {self.batch_size} does not split equally across "
                              f"{self.num_workers} workers: use {fix}, or another --num-workers")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per dataclass field plus ``--config FILE.yaml``."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of options (keys as the flags, with _); flags override it")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(cls, f)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text,
                                **{k: v for k, v in f.metadata.items() if k in ("choices", "metavar")})
    return parser


def load_yaml(path: str) -> dict:
    from basnet import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    """Builds a config from a dict, refusing keys the dataclass does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} in {source}: known options are "
                          f"{', '.join(sorted(known))}")
    return cls(**data)


def parse_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """Parses flags over an optional YAML file into a ``cls`` instance."""
    parser = build_parser(cls, description)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        defaults = load_yaml(pre.config)
        from_dict(cls, defaults, source=pre.config)  # refuses unknown keys
        parser.set_defaults(**defaults)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return cls(**args)
