"""The per-epoch engine: one training step, one epoch, one validation pass.

It knows nothing of how it was launched (Ray Train, a test, a notebook): it takes a model, an
iterable of batches and a device, so it is tested on plain tensors without Ray.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from basnet.loss import HybridLoss
from basnet.metrics import SODMetrics
from basnet.transforms import mask_to_target, to_model_input

__all__ = ["Precision", "precision_for", "train_step", "train_epoch", "predict_probabilities",
           "validate", "EpochStats"]

Batch = dict[str, "np.ndarray | torch.Tensor"]


@dataclass(frozen=True)
class Precision:
    """Autocast settings: bf16 on GPUs that support it, fp16 + loss scaling on older GPUs, fp32 on CPU."""

    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def precision_for(device: torch.device) -> Precision:
    if device.type != "cuda":
        return Precision(None)
    return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float


def _inputs(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
    mask = torch.as_tensor(batch["mask"]).to(device, non_blocking=True)
    return to_model_input(image), mask_to_target(mask)


def train_step(model: nn.Module, batch: Batch, loss_fn: HybridLoss, optimizer: torch.optim.Optimizer,
               *, device: torch.device, precision: Precision = Precision(None),
               scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimisation step on one batch; returns the loss."""
    x, target = _inputs(batch, device)
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
    return float(loss.detach())


def train_epoch(model: nn.Module, batches: Iterable[Batch], loss_fn: HybridLoss,
                optimizer: torch.optim.Optimizer, *, device: torch.device,
                precision: Precision = Precision(None), scaler=None) -> EpochStats:
    model.train()
    start, total, images = time.perf_counter(), 0.0, 0
    for batch in batches:
        n = len(batch["image"])
        if n == 0:
            continue
        total += train_step(model, batch, loss_fn, optimizer, device=device,
                            precision=precision, scaler=scaler) * n
        images += n
    return EpochStats(loss=total / max(images, 1), images=images, seconds=time.perf_counter() - start)


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, *, device: torch.device,
                          precision: Precision = Precision(None)) -> torch.Tensor:
    """Saliency in [0, 1] per the test protocol: sigmoid of the refined output, min-max per image.

    ``images`` is uint8 NHWC; the result is float32 (N, H, W) on the CPU.
    """
    x = to_model_input(images.to(device))
    with precision.autocast(device):
        refined = model(x)[0]
    prob = torch.sigmoid(refined.float())[:, 0]
    lo = prob.amin(dim=(1, 2), keepdim=True)
    hi = prob.amax(dim=(1, 2), keepdim=True)
    return ((prob - lo) / (hi - lo).clamp_min(1e-8)).cpu()


def validate(model: nn.Module, batches: Iterable[Batch], *, device: torch.device,
             precision: Precision = Precision(None)) -> SODMetrics:
    """Scores the model on validation batches (at the training size); returns mergeable metrics."""
    model.eval()
    metrics = SODMetrics()
    for batch in batches:
        if len(batch["image"]) == 0:
            continue
        prob = predict_probabilities(model, torch.from_numpy(np.array(batch["image"])), device=device, precision=precision)
        preds = (prob * 255).round().to(torch.uint8).numpy()
        for pred, gt in zip(preds, np.asarray(batch["mask"])):
            metrics.update(pred, gt)
    return metrics
