"""The per-epoch engine: the model's setup, one training step, one epoch, one validation pass.

It knows nothing of how it was launched (Ray Train, a test, a notebook): it takes a model, an
iterable of batches and a device, so it is tested on plain tensors without Ray.

No step reads a value back from the device: the loss is summed on the device and read once per
logging interval (and once at the end of the epoch), so a GPU is never stalled waiting for the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from basnet.checkpoint import restore_training_state
from basnet.device import (
    FP32,
    Precision,
    compile_model,
    grad_scaler,
    mask_to_target,
    memory_format,
    resolve_precision,
    to_device,
    to_model_input,
)
from basnet.errors import ConfigError
from basnet.loss import HybridLoss
from basnet.metrics import SODMetrics
from basnet.model import BASNet
from basnet.predict import predict_probabilities

__all__ = ["TrainingState", "build_training_state", "use_sync_bn", "train_step", "train_epoch", "StepLog",
           "EpochStats", "steps_per_epoch", "validate"]

Batch = dict[str, "np.ndarray | torch.Tensor"]
SYNC_BN_BELOW = 8  # --sync-bn auto: per-worker batches smaller than this give BatchNorm poor statistics


def use_sync_bn(mode: str, *, device: torch.device, world_size: int, per_worker_batch: int) -> bool:
    """Whether BatchNorm statistics are synchronised across workers (``--sync-bn auto|on|off``).

    ``auto`` turns it on with several workers whose share of the batch is under 8 images.
    SyncBatchNorm runs on GPUs only (PyTorch refuses CPU tensors).

    Raises:
        ConfigError: ``on`` on a CPU run.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--sync-bn {mode!r} is not one of auto, on, off")
    if mode == "on" and device.type != "cuda":
        raise ConfigError("--sync-bn on needs GPUs (PyTorch's SyncBatchNorm refuses CPU tensors): "
                          "use --sync-bn auto or off on CPU")
    if mode == "auto":
        return device.type == "cuda" and world_size > 1 and per_worker_batch < SYNC_BN_BELOW
    return mode == "on" and world_size > 1


@dataclass
class TrainingState:
    """What a training loop works with, set up in the order that makes every part device-correct.

    ``model`` is what the step calls (DDP-wrapped, maybe compiled); ``module`` the bare BASNet
    whose state dict is saved and which validation calls (DDP's forward is a collective).
    """

    model: nn.Module
    module: BASNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    precision: Precision
    memory_format: torch.memory_format
    epoch: int = 0
    metrics: dict = field(default_factory=dict)


def build_training_state(cfg, device: torch.device, *, world_size: int = 1, per_worker_batch: int | None = None,
                         wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                         checkpoint: dict | None = None) -> TrainingState:
    """Model, optimizer and scaler for a ``TrainConfig``, in torchvision's reference order.

    model to the device -> SyncBatchNorm -> channels_last -> ``wrap`` (DDP) -> optimizer ->
    restore the model, optimizer and scaler state from ``checkpoint`` -> torch.compile. The
    optimizer is built on parameters that already live on the device, so a restored Adam state
    lands there too (``Optimizer.load_state_dict`` casts it to its parameter's device).
    """
    torch.manual_seed(cfg.seed)
    backbone = None if cfg.backbone_weights in (None, "none") else cfg.backbone_weights
    module = BASNet(backbone_weights=backbone).to(device)
    if use_sync_bn(cfg.sync_bn, device=device, world_size=world_size,
                   per_worker_batch=per_worker_batch or cfg.batch_size):
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    fmt = memory_format(cfg.channels_last, device)
    module = module.to(memory_format=fmt)
    model = wrap(module)
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    precision = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(precision, device)
    epoch, metrics = restore_training_state(checkpoint, module, optimizer, scaler) if checkpoint else (0, {})
    return TrainingState(compile_model(model, cfg.compile), module, optimizer, scaler, precision, fmt, epoch, metrics)


def _inputs(batch: Batch, device: torch.device, fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    image = to_device(torch.as_tensor(batch["image"]), device)
    mask = to_device(torch.as_tensor(batch["mask"]), device)
    return to_model_input(image, memory_format=fmt), mask_to_target(mask)


def train_step(model: nn.Module, batch: Batch, loss_fn: HybridLoss, optimizer: torch.optim.Optimizer,
               *, device: torch.device, precision: Precision = FP32, scaler: torch.amp.GradScaler | None = None,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """One optimisation step on one batch; returns the loss as a detached tensor on the device
    (reading it is a host sync: leave that to the caller's logging interval)."""
    x, target = _inputs(batch, device, memory_format)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast(device):
        logits = model(x)
    loss = loss_fn([t.float() for t in logits], target)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


@dataclass(frozen=True)
class StepLog:
    """What rank 0 prints every ``--log-every`` steps."""

    epoch: int
    step: int
    steps: int | None
    loss: float  # mean over the steps since the last line
    images_per_s: float
    eta_s: float | None

    def line(self) -> str:
        of = f"{self.step}/{self.steps}" if self.steps else str(self.step)
        eta = f"  ETA {_clock(self.eta_s)}" if self.eta_s is not None else ""
        return f"epoch {self.epoch:>3}  step {of}  loss {self.loss:.4f}  {self.images_per_s:.2f} img/s{eta}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class EpochStats:
    """One epoch of one worker: the loss summed over its images (on the device), images, seconds."""

    loss_sum: torch.Tensor
    images: int
    seconds: float

    @property
    def loss(self) -> float:
        """Mean loss per image (a host sync)."""
        return float(self.loss_sum) / max(self.images, 1)


class _Window:
    """Loss and images since the last log line; the loss stays on the device until ``read``."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.images, self.steps, self.start = 0, 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, images: int) -> None:
        self.loss += loss_sum
        self.images += images
        self.steps += 1

    def read(self, epoch: int, step: int, steps: int | None) -> StepLog:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        mean = float(self.loss) / max(self.images, 1)  # the interval's one host sync
        eta = (steps - step) * seconds / self.steps if steps and steps >= step else None
        return StepLog(epoch, step, steps, mean, self.images / seconds, eta)


def train_epoch(model: nn.Module, batches: Iterable[Batch], loss_fn: HybridLoss, optimizer: torch.optim.Optimizer,
                *, device: torch.device, precision: Precision = FP32, scaler: torch.amp.GradScaler | None = None,
                memory_format: torch.memory_format = torch.contiguous_format, epoch: int = 0,
                log_every: int = 0, on_log: Callable[[StepLog], None] | None = None,
                steps: int | None = None) -> EpochStats:
    """Trains one pass over ``batches``; calls ``on_log`` every ``log_every`` steps (if given)."""
    model.train()
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    images, step = 0, 0
    window = _Window(device) if on_log and log_every > 0 else None
    for batch in batches:
        n = len(batch["image"])
        if n == 0:
            continue
        loss_sum = train_step(model, batch, loss_fn, optimizer, device=device, precision=precision,
                              scaler=scaler, memory_format=memory_format) * n
        total += loss_sum
        images, step = images + n, step + 1
        if window is not None:
            window.add(loss_sum, n)
            if step % log_every == 0:
                on_log(window.read(epoch, step, steps))
                window = _Window(device)
    return EpochStats(loss_sum=total, images=images, seconds=time.perf_counter() - start)


def steps_per_epoch(images: int, world_size: int, per_worker_batch: int) -> int:
    """Full batches each worker sees in one epoch of ``images`` split equally across the workers
    (a last, incomplete batch is dropped)."""
    return (images // max(world_size, 1)) // per_worker_batch


def validate(model: nn.Module, batches: Iterable[Batch], *, device: torch.device, precision: Precision = FP32,
             memory_format: torch.memory_format = torch.contiguous_format) -> SODMetrics:
    """Scores the model on validation batches (at the training size); returns mergeable metrics."""
    model.eval()
    metrics = SODMetrics()
    for batch in batches:
        if len(batch["image"]) == 0:
            continue
        prob = predict_probabilities(model, torch.from_numpy(np.array(batch["image"])), device=device,
                                     precision=precision, memory_format=memory_format)
        preds = (prob * 255).round().to(torch.uint8).numpy()
        for pred, gt in zip(preds, np.asarray(batch["mask"])):
            metrics.update(pred, gt)
    return metrics
