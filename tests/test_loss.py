"""The hybrid loss against independent computations of the original's BCE + (1 - SSIM) + IoU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from basnet.loss import DEFAULT_LOSS_WEIGHTS, HybridLoss, bce_term, iou_term, ssim_term

REL = 1e-3


def _target(n: int, size: int, seed: int) -> torch.Tensor:
    """Blob masks with soft edges, like resized DUTS masks: (n, 1, size, size) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(n):
        cy, cx = torch.rand(2, generator=gen) * size * 0.5 + size * 0.25
        radius = size * (0.15 + 0.2 * torch.rand(1, generator=gen))
        dist = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
        masks.append(torch.sigmoid((radius - dist) * 1.5))
    return torch.stack(masks)[:, None]


def _logits(n_outputs: int, target: torch.Tensor, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [3 * (2 * target - 1) + 2 * torch.randn(target.shape, generator=gen) for _ in range(n_outputs)]


def _window64() -> torch.Tensor:
    # The original's window: 1-D Gaussian exp(-(x - 5)^2 / (2 * 1.5^2)) normalised, outer product.
    g = torch.tensor([math.exp(-((x - 5) ** 2) / (2 * 1.5**2)) for x in range(11)], dtype=torch.float64)
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def _ref_ssim(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w = _window64().to(p.dtype)
    mean = lambda x: F.conv2d(x, w, padding=5)  # noqa: E731  zero padding, as the original
    mu_p, mu_g = mean(p), mean(g)
    s_pp = mean(p * p) - mu_p**2
    s_gg = mean(g * g) - mu_g**2
    s_pg = mean(p * g) - mu_p * mu_g
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_p * mu_g + c1) * (2 * s_pg + c2)) / ((mu_p**2 + mu_g**2 + c1) * (s_pp + s_gg + c2))
    return ssim_map.mean()


def _ref_iou(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for i in range(p.shape[0]):
        inter = (p[i] * g[i]).sum()
        total = total + 1 - inter / (p[i].sum() + g[i].sum() - inter)
    return total / p.shape[0]


def _ref_explicit_bce(logits: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return -(g * torch.log(p) + (1 - g) * torch.log(1 - p)).mean()


def _reference(logits_seq: list[torch.Tensor], g: torch.Tensor, bce) -> torch.Tensor:
    total = 0.0
    for logits in logits_seq:
        p = torch.sigmoid(logits)
        total = total + bce(logits, g) + (1 - _ref_ssim(p, g)) + _ref_iou(p, g)
    return total


@pytest.mark.parametrize("size", [32, 64])
def test_hybrid_loss_matches_explicit_float64_reference(size: int) -> None:
    target = _target(3, size, seed=size)
    logits = _logits(4, target, seed=size + 1)
    got = HybridLoss()(logits, target)
    want = _reference([x.double() for x in logits], target.double(), _ref_explicit_bce)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=REL)


@pytest.mark.parametrize("size", [32, 64])
def test_hybrid_loss_matches_original_sigmoid_then_bceloss(size: int) -> None:
    target = _target(2, size, seed=10 + size)
    logits = _logits(8, target, seed=11 + size)
    bce_loss = torch.nn.BCELoss()  # the original: sigmoid inside the model, BCELoss on probabilities
    want = _reference(logits, target, lambda x, g: bce_loss(torch.sigmoid(x), g))
    assert HybridLoss()(logits, target).item() == pytest.approx(want.item(), rel=REL)


def test_each_term_matches_its_reference() -> None:
    target = _target(2, 32, seed=3)
    (logits,) = _logits(1, target, seed=4)
    p, p64, g64 = torch.sigmoid(logits), torch.sigmoid(logits.double()), target.double()
    want_bce = _ref_explicit_bce(logits.double(), g64).item()
    assert bce_term(logits, target).item() == pytest.approx(want_bce, rel=REL)
    assert ssim_term(p, target).item() == pytest.approx(1 - _ref_ssim(p64, g64).item(), rel=REL)
    assert iou_term(p, target).item() == pytest.approx(_ref_iou(p64, g64).item(), rel=REL)


def test_perfect_prediction_has_lower_loss_than_noisy_one() -> None:
    target = (_target(2, 32, seed=5) > 0.5).float()
    perfect = 20 * (2 * target - 1)
    noisy = perfect + 30 * torch.randn(target.shape, generator=torch.Generator().manual_seed(6))
    loss = HybridLoss()
    assert loss([perfect] * 3, target) < loss([noisy] * 3, target)
    assert loss(perfect, target).item() < 0.01


def test_weights_scale_terms_and_zero_weight_removes_a_term() -> None:
    target = _target(2, 32, seed=7)
    logits = _logits(3, target, seed=8)
    terms = {
        "bce_weight": sum(bce_term(x, target) for x in logits),
        "ssim_weight": sum(ssim_term(torch.sigmoid(x), target) for x in logits),
        "iou_weight": sum(iou_term(torch.sigmoid(x), target) for x in logits),
    }
    for name, term in terms.items():
        only = {key: 0.0 for key in DEFAULT_LOSS_WEIGHTS} | {name: 2.5}
        assert HybridLoss(**only)(logits, target).item() == pytest.approx(2.5 * term.item(), rel=1e-5)
    weights = {"bce_weight": 0.5, "ssim_weight": 0.0, "iou_weight": 2.0}
    want = 0.5 * terms["bce_weight"] + 2.0 * terms["iou_weight"]
    assert HybridLoss(**weights)(logits, target).item() == pytest.approx(want.item(), rel=1e-5)


def test_default_weights_are_the_papers_equal_weights() -> None:
    target = _target(1, 32, seed=9)
    logits = _logits(2, target, seed=10)
    assert DEFAULT_LOSS_WEIGHTS == {"bce_weight": 1.0, "ssim_weight": 1.0, "iou_weight": 1.0}
    assert HybridLoss(**DEFAULT_LOSS_WEIGHTS)(logits, target).item() == HybridLoss()(logits, target).item()


def test_gradient_flows_to_every_output() -> None:
    target = _target(2, 32, seed=11)
    logits = [x.requires_grad_() for x in _logits(3, target, seed=12)]
    HybridLoss()(logits, target).backward()
    for x in logits:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_single_tensor_equals_one_element_sequence() -> None:
    target = _target(2, 32, seed=13)
    (logits,) = _logits(1, target, seed=14)
    loss = HybridLoss()
    assert loss(logits, target).item() == loss([logits], target).item()
    assert loss(logits, target).dim() == 0


def test_autocast_computes_in_float32() -> None:
    target = _target(2, 32, seed=15)
    logits = _logits(2, target, seed=16)
    full = HybridLoss()(logits, target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = HybridLoss()([x.bfloat16() for x in logits], target)
    assert mixed.dtype == torch.float32
    # Only the bfloat16 rounding of the logits themselves differs.
    assert mixed.item() == pytest.approx(full.item(), rel=1e-2)


def test_bad_shapes_and_weights_raise_value_error() -> None:
    target = _target(1, 32, seed=17)
    with pytest.raises(ValueError, match="differ in shape"):
        HybridLoss()(torch.zeros(1, 1, 64, 64), target)
    with pytest.raises(ValueError, match="no outputs"):
        HybridLoss()([], target)
    with pytest.raises(ValueError, match="iou_weight"):
        HybridLoss(iou_weight=-1.0)
