"""How the model runs on its device: its input tensors, precision, memory format, host-to-device
copies, compilation.

One set of rules for training, bulk masking and evaluation, so ``--precision``,
``--channels-last`` and ``--compile`` mean the same thing in every job:

* ``--precision auto`` is bf16 autocast on GPUs that support it, fp16 autocast with a
  GradScaler on older GPUs, and fp32 on CPU. bf16 and fp16 also run on CPU (CPU autocast), which
  is how the tests exercise the mixed-precision code; it is slow there (these AVX2 cores have no
  bf16 units: BASNet at 64 px took 24 s per image in bf16 against 0.26 s in fp32).
* channels_last (NHWC) is the fast layout for cuDNN's convolutions; ``auto`` turns it on for
  CUDA only. It must be applied to the model before DDP wraps it, and to every input.
* Batches bound for a GPU are copied from pinned host memory without blocking the host.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from basnet.config import PRECISIONS
from basnet.errors import ConfigError
from basnet.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "Precision", "FP32", "resolve_precision", "grad_scaler", "memory_format",
           "to_device", "compile_model", "to_model_input", "mask_to_target"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """Autocast settings: ``dtype`` None is plain fp32."""

    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


FP32 = Precision(None)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The autocast settings ``--precision name`` means on ``device``.

    Raises:
        ConfigError: An unknown name, or bf16 on a GPU without bf16 support.
    """
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return FP32
        return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                          "use --precision fp16 or auto")
    return Precision(_DTYPES[name])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 training, else None."""
    return torch.amp.GradScaler(device.type) if precision.needs_scaler else None


def memory_format(channels_last: bool | None, device: torch.device) -> torch.memory_format:
    """``torch.channels_last`` when asked for, or by default (None) on CUDA; else contiguous NCHW."""
    wanted = device.type == "cuda" if channels_last is None else channels_last
    return torch.channels_last if wanted else torch.contiguous_format


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies a host tensor to ``device``; to a GPU from pinned memory, without blocking the host."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when enabled (inductor; on CPU it needs a C++ compiler)."""
    if not enabled:
        return model
    logger.info("compiling the model with torch.compile (the first batches take longer)")
    return torch.compile(model)


def _as_uint8_tensor(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        tensor = batch
    else:
        array = np.asarray(batch)
        if not array.flags.writeable:  # Ray hands out read-only buffers; torch warns on those
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype != torch.uint8:
        raise TypeError(f"expected uint8 values 0..255, got {tensor.dtype}")
    return tensor


def to_model_input(batch: np.ndarray | torch.Tensor, *, memory_format: torch.memory_format = torch.contiguous_format
                   ) -> torch.Tensor:
    """Turn a uint8 NHWC batch into the model's float32 NCHW input.

    Scales to [0, 1], then normalises with the ImageNet mean and std (the ResNet-34 encoder was
    pretrained that way). Tensors stay on their device.

    Args:
        batch: ``uint8`` (N, H, W, 3) numpy array or torch tensor.
        memory_format: Layout of the result: ``torch.channels_last`` for a channels_last model
            (NHWC input permuted is that layout already, so it costs no copy).

    Returns:
        ``float32`` tensor (N, 3, H, W).
    """
    tensor = _as_uint8_tensor(batch)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3), got {tuple(tensor.shape)}")
    x = tensor.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=memory_format)


def mask_to_target(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn a uint8 NHW mask batch into a float32 (N, 1, H, W) target in [0, 1].

    Args:
        batch: ``uint8`` (N, H, W) numpy array or torch tensor.

    Returns:
        ``float32`` tensor (N, 1, H, W) on the input's device.
    """
    tensor = _as_uint8_tensor(batch)
    if tensor.ndim != 3:
        raise ValueError(f"expected (N, H, W), got {tuple(tensor.shape)}")
    return tensor.unsqueeze(1).to(torch.float32).div_(255.0)
