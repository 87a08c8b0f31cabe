"""The test protocol's prediction: BASNet's refined output as saliency in [0, 1] (needs torch).

Per the protocol (docs/protocol.md): the image resized to the model's size, the forward pass, the
sigmoid of the refined map, min-max normalised per image. ``basnet.transforms.render_output``
takes it back to the image's original size as a PNG; bulk masking, serving, evaluation and
training's validation all go through these two.
"""

from __future__ import annotations

import torch
from torch import nn

from basnet.device import FP32, Precision, to_device, to_model_input

__all__ = ["predict_probabilities", "predict_raw"]


@torch.no_grad()
def predict_raw(model: nn.Module, images: torch.Tensor, *, device: torch.device, precision: Precision = FP32,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The sigmoid of the refined output as it is, before normalisation (what ``basnet.quality``
    judges a mask by): float32 (N, H, W) on the CPU for uint8 NHWC ``images``."""
    return _sigmoid_maps(model, images, device=device, precision=precision, memory_format=memory_format).cpu()


def _sigmoid_maps(model: nn.Module, images: torch.Tensor, *, device: torch.device, precision: Precision,
                  memory_format: torch.memory_format) -> torch.Tensor:
    x = to_model_input(to_device(images, device), memory_format=memory_format)
    with precision.autocast(device):
        refined = model(x)[0]
    return torch.sigmoid(refined.float())[:, 0]


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, *, device: torch.device,
                          precision: Precision = FP32,
                          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Saliency in [0, 1]: sigmoid of the refined output, min-max per image.

    ``images`` is uint8 NHWC; the result is float32 (N, H, W) on the CPU.
    """
    prob = _sigmoid_maps(model, images, device=device, precision=precision, memory_format=memory_format)
    lo = prob.amin(dim=(1, 2), keepdim=True)
    hi = prob.amax(dim=(1, 2), keepdim=True)
    return ((prob - lo) / (hi - lo).clamp_min(1e-8)).cpu()
