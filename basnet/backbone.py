"""The ResNet-34 pieces BASNet is built from, without importing torchvision.

BASNet's encoder is ResNet-34's ``layer1..layer4`` and its two extra stages are ResNet basic
blocks, so the model needs the block and the four layers, nothing else of torchvision. Importing
torchvision costs every process that builds the model 1.6-3 s and 160 MB (it imports
``torch._dynamo`` through ``torchvision.ops``): each training worker, masking replica and serve
replica. Torchvision is still what downloads the ImageNet weights (``basnet.model``), imported
only then.

The parameter names are torchvision's (``layer2.0.downsample.0.weight``...), so its state dicts
and the original release's ``basnet.pth`` load unchanged, and :func:`resnet34_layers` draws its
random initialisation in torchvision's order: with the same seed it returns the same weights as
``torchvision.models.resnet34(weights=None)``'s layers (tests/test_model.py compares them).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "resnet34_layers"]

_RESNET34 = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride) per layer


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet-18/34's block)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:  # made before the first block, as torchvision does
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample),
                         *(BasicBlock(planes, planes) for _ in range(blocks - 1)))


def resnet34_layers() -> list[nn.Sequential]:
    """ResNet-34's ``layer1..layer4``, initialised as torchvision initialises ``resnet34()``.

    The stem and classifier that BASNet drops are made and thrown away, so the random numbers
    drawn for the kept layers are the ones torchvision's constructor draws for them.
    """
    stem = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    layers, inplanes = [], 64
    for planes, blocks, stride in _RESNET34:
        layers.append(_layer(inplanes, planes, blocks, stride))
        inplanes = planes
    nn.Linear(512, 1000)  # the classifier: drawn, then dropped
    for module in (stem, *(m for layer in layers for m in layer.modules())):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return layers
