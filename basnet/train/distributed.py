"""What training workers share, through ``torch.distributed``: epoch totals, validation scores,
BatchNorm buffers and replica digests. Every tensor handed to a collective lives on the loop's
device: with GPUs the process group is NCCL's, which takes CUDA tensors only.

Without a process group (one process, a test) every function works on its own data alone.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from basnet.metrics import SODMetrics
from basnet.train.engine import EpochStats

__all__ = ["all_sum", "gather_metrics", "sync_buffers", "epoch_metrics", "replica_digests"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the workers in place. It must live on the loop's device: with GPUs the
    process group is NCCL's, which takes CUDA tensors only."""
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def gather_metrics(local: SODMetrics) -> SODMetrics:
    """Every worker's validation scores, merged (``all_gather_object`` moves its payload itself)."""
    if not _distributed():
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged = SODMetrics()
    for part in parts:
        merged.merge(part)
    return merged


def sync_buffers(model: torch.nn.Module) -> None:
    """BatchNorm running stats drift apart on each rank's data: take rank 0's, so every rank
    (and the checkpoint) holds the same model. The buffers live on the loop's device."""
    if _distributed():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def epoch_metrics(epoch: int, stats: EpochStats | None, val: SODMetrics, device: torch.device) -> dict:
    """The epoch's figures over all workers; one collective and one host read for the training part."""
    scores = val.compute() if len(val) else {"mae": float("nan"), "max_f": float("nan")}
    world = dist.get_world_size() if _distributed() else 1
    loss, images_per_s = float("nan"), 0.0
    if stats is not None:
        totals = torch.stack([stats.loss_sum.to(device, torch.float64),
                              torch.tensor(float(stats.images), dtype=torch.float64, device=device),
                              torch.tensor(stats.seconds, dtype=torch.float64, device=device)])
        loss_sum, images, seconds = all_sum(totals).tolist()
        loss = loss_sum / max(images, 1)
        images_per_s = images / (seconds / world) if seconds else 0.0
    return {"epoch": epoch, "train_loss": loss, "val_mae": scores["mae"], "val_max_f": scores["max_f"],
            "val_images": len(val), "images_per_s": images_per_s}


def replica_digests(module: torch.nn.Module) -> list[str]:
    """A hash of every parameter and buffer, from every rank: equal when the replicas agree."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if not _distributed():
        return [h.hexdigest()]
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return digests
