"""BASNet's hybrid loss: BCE + (1 - SSIM) + IoU on every side output, summed.

Qin et al., "BASNet: Boundary-Aware Salient Object Detection", CVPR 2019
(https://openaccess.thecvf.com/content_CVPR_2019/html/Qin_BASNet_Boundary-Aware_Salient_Object_Detection_CVPR_2019_paper.html).

The three terms work at three levels: BCE per pixel, SSIM per 11x11 patch (it weighs the
boundary, where the local statistics of prediction and mask differ most) and IoU per map.
The terms are pure functions; ``HybridLoss`` only weighs and sums them over the outputs.

The model returns logits, so BCE is taken with logits (stable, and safe under autocast);
SSIM and IoU work on probabilities. Everything is computed in float32 even under autocast,
because SSIM's variances (E[x^2] - E[x]^2) lose all precision in half precision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel2d
from torch import Tensor, nn

__all__ = ["DEFAULT_LOSS_WEIGHTS", "HybridLoss", "bce_term", "iou_term", "ssim_term"]

logger = logging.getLogger(__name__)

# Keyword arguments of ``HybridLoss`` (and fields of ``TrainConfig``): the paper's equal weights.
# Copy before changing: ``HybridLoss(**{**DEFAULT_LOSS_WEIGHTS, "iou_weight": 2.0})``.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"bce_weight": 1.0, "ssim_weight": 1.0, "iou_weight": 1.0}

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2  # (K1 * L)^2 with L = 1, the dynamic range of probabilities
SSIM_C2 = 0.03**2
# Guards 1 - I/U against an empty union (empty mask and probabilities that underflowed to 0);
# far below any union of real maps, so it never changes a value otherwise.
_IOU_EPS = 1e-7


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    if a.dim() != 4 or a.shape[1] != 1:
        raise ValueError(f"{names[0]} must have shape (N, 1, H, W), got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} differ in shape: "
                         "resize the mask to the model's output size")


def bce_term(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of ``sigmoid(logits)`` against ``target``, mean over all pixels.

    Args:
        logits: (N, 1, H, W) logits.
        target: (N, 1, H, W) mask in [0, 1] (soft values allowed).

    Returns:
        A scalar float32 tensor.
    """
    _check_pair(logits, target, ("logits", "target"))
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def _gaussian_window(device: torch.device) -> Tensor:
    """The (1, 1, 11, 11) normalised Gaussian window (sigma 1.5) of the original SSIM."""
    kernel = get_gaussian_kernel2d((SSIM_WINDOW, SSIM_WINDOW), (SSIM_SIGMA, SSIM_SIGMA),
                                   device=device, dtype=torch.float32)
    return kernel.reshape(1, 1, SSIM_WINDOW, SSIM_WINDOW)


def _local_mean(x: Tensor, window: Tensor) -> Tensor:
    # Zero padding, as the original: near the border the window covers zeros, which pulls local
    # means down; reflect padding (kornia.metrics.ssim) changes the value by up to a few percent.
    return F.conv2d(x, window, padding=SSIM_WINDOW // 2)


def ssim_term(prob: Tensor, target: Tensor) -> Tensor:
    """One minus the structural similarity of ``prob`` and ``target``, mean over the SSIM map.

    Gaussian window 11x11, sigma 1.5, zero padding, C1 = 0.01^2, C2 = 0.03^2: the SSIM of
    the original BASNet release.

    Args:
        prob: (N, 1, H, W) probabilities in [0, 1].
        target: (N, 1, H, W) mask in [0, 1].

    Returns:
        A scalar float32 tensor, 0 for identical maps.
    """
    _check_pair(prob, target, ("prob", "target"))
    with torch.autocast(device_type=prob.device.type, enabled=False):
        x, y = prob.float(), target.float()
        window = _gaussian_window(x.device)
        mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)  # (N, 1, H, W)
        var_x = _local_mean(x * x, window) - mu_x * mu_x
        var_y = _local_mean(y * y, window) - mu_y * mu_y
        cov_xy = _local_mean(x * y, window) - mu_x * mu_y
        luminance = (2 * mu_x * mu_y + SSIM_C1) / (mu_x * mu_x + mu_y * mu_y + SSIM_C1)
        structure = (2 * cov_xy + SSIM_C2) / (var_x + var_y + SSIM_C2)
        return 1 - (luminance * structure).mean()


def iou_term(prob: Tensor, target: Tensor) -> Tensor:
    """Soft IoU loss ``1 - I/U`` per image, mean over the batch.

    Args:
        prob: (N, 1, H, W) probabilities in [0, 1].
        target: (N, 1, H, W) mask in [0, 1].

    Returns:
        A scalar float32 tensor, 0 for a perfect binary prediction.
    """
    _check_pair(prob, target, ("prob", "target"))
    with torch.autocast(device_type=prob.device.type, enabled=False):
        p, g = prob.float().flatten(1), target.float().flatten(1)  # (N, H*W)
        intersection = (p * g).sum(dim=1)
        union = p.sum(dim=1) + g.sum(dim=1) - intersection
        return (1 - intersection / union.clamp_min(_IOU_EPS)).mean()


class HybridLoss(nn.Module):
    """The weighted sum of BCE, (1 - SSIM) and IoU over all side outputs.

    Args:
        bce_weight: weight of the BCE term.
        ssim_weight: weight of the (1 - SSIM) term.
        iou_weight: weight of the IoU term. A zero weight skips its term entirely.
    """

    def __init__(self, *, bce_weight: float = 1.0, ssim_weight: float = 1.0, iou_weight: float = 1.0) -> None:
        super().__init__()
        weights = {"bce_weight": bce_weight, "ssim_weight": ssim_weight, "iou_weight": iou_weight}
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.bce_weight, self.ssim_weight, self.iou_weight = bce_weight, ssim_weight, iou_weight

    def output_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The weighted loss of one (N, 1, H, W) logit map; a scalar float32 tensor."""
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.bce_weight:
            loss = loss + self.bce_weight * bce_term(logits, target)
        if self.ssim_weight or self.iou_weight:
            prob = torch.sigmoid(logits.float())
            if self.ssim_weight:
                loss = loss + self.ssim_weight * ssim_term(prob, target)
            if self.iou_weight:
                loss = loss + self.iou_weight * iou_term(prob, target)
        return loss

    def forward(self, logits_seq: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        """Sums the loss over the outputs.

        Args:
            logits_seq: one (N, 1, H, W) logit map or a sequence of them (BASNet's 8 outputs).
            target: (N, 1, H, W) mask in [0, 1].

        Returns:
            A scalar float32 tensor.
        """
        outputs = [logits_seq] if isinstance(logits_seq, Tensor) else list(logits_seq)
        if not outputs:
            raise ValueError("HybridLoss got no outputs: pass a logit map or a sequence of them")
        total = self.output_loss(outputs[0], target)
        for logits in outputs[1:]:
            total = total + self.output_loss(logits, target)
        return total

    def extra_repr(self) -> str:
        return f"bce_weight={self.bce_weight}, ssim_weight={self.ssim_weight}, iou_weight={self.iou_weight}"
