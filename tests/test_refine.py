"""Guided upsampling and foreground colours (basnet/imaging/refine.py) on small composites whose
true alpha and foreground are known; the figures at 2 and 12 MP are bench/refine.py's."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from basnet.imaging import decode_image, decode_mask, default_refine, render_output, upsample
from basnet.imaging import refine as refine_module
from basnet.imaging.refine import BAND, estimate_foreground, refine_mask

GREEN = np.array([0, 1, 0], np.float32)


def composite(height: int = 240, width: int = 320, seed: int = 0):
    """A textured disc with a soft and a sharp side over a textured background of another colour:
    (photo uint8, true alpha float32, true foreground float32)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.arctan2(yy - height / 2, xx - width / 2)
    softness = 1 + 8 * (0.5 + 0.5 * np.sin(angle)) ** 2
    alpha = np.clip((height * 0.3 - np.hypot(yy - height / 2, xx - width / 2)) / softness + 0.5, 0, 1)
    cells = cv2.resize(rng.random((height // 12, width // 12, 3)).astype(np.float32), (width, height))
    fg = np.clip(np.array([0.85, 0.3, 0.2], np.float32) + 0.2 * (cells - 0.5), 0, 1)
    bg = np.clip(np.array([0.2, 0.4, 0.8], np.float32) + 0.4 * (cells[::-1, ::-1] - 0.5), 0, 1)
    a = alpha[..., None]
    photo = np.clip(np.rint((a * fg + (1 - a) * bg) * 255), 0, 255).astype(np.uint8)
    return photo, alpha.astype(np.float32), fg


def sad_and_gradient(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    pred = pred.astype(np.float32) / 255
    grad = ndimage.gaussian_gradient_magnitude(pred, 1.4) - ndimage.gaussian_gradient_magnitude(truth, 1.4)
    return float(np.abs(pred - truth).sum()), float((grad * grad).sum())


def test_guided_upsampling_follows_the_photos_edges_and_keeps_the_plain_map_outside_the_band():
    photo, alpha, _ = composite()
    prob = cv2.resize(alpha, (32, 32), interpolation=cv2.INTER_AREA)  # a perfect model's 32 px map
    plain = np.asarray(upsample(prob, *alpha.shape))
    refined = refine_mask(prob, photo, plain)
    (plain_sad, plain_grad), (sad, grad) = sad_and_gradient(plain, alpha), sad_and_gradient(refined, alpha)
    print(f"refined / plain at 240 x 320 from 32 px: SAD {sad / plain_sad:.2f}x, gradient {grad / plain_grad:.2f}x")
    assert sad < 0.6 * plain_sad and grad < 0.5 * plain_grad
    outside = (plain <= BAND[0]) | (plain >= BAND[1])
    assert outside.any() and np.array_equal(refined[outside], plain[outside])


def test_estimated_foreground_takes_the_old_background_out_of_edge_pixels_only():
    photo, alpha, fg = composite()
    alpha8 = np.clip(np.rint(alpha * 255), 0, 255).astype(np.uint8)
    estimated = estimate_foreground(photo, alpha8)
    a, band = alpha[..., None], (alpha > 0.01) & (alpha < 0.99)
    truth = a * fg + (1 - a) * GREEN

    def error(colours):
        return float(np.abs(a * colours / 255 + (1 - a) * GREEN - truth)[band].mean())

    naive, better = error(photo.astype(np.float32)), error(estimated.astype(np.float32))
    print(f"colour error over green: naive {naive * 255:.2f}, estimated {better * 255:.2f} grey levels")
    assert better < 0.7 * naive
    whole = (alpha8 == 0) | (alpha8 == 255)
    assert np.array_equal(estimated[whole], photo[whole])


def test_foreground_estimated_in_strips_equals_the_estimate_in_one_piece(monkeypatch):
    photo, alpha, _ = composite(200, 96, seed=1)
    alpha8 = np.clip(np.rint(alpha * 255), 0, 255).astype(np.uint8)
    monkeypatch.setattr(refine_module, "_NARROW", 1 / 25)  # a halo of 8 rows, wider than a strip
    whole = estimate_foreground(photo, alpha8)
    monkeypatch.setattr(refine_module, "_STRIP", 7)  # many strips, each with the narrow blur's halo
    assert np.array_equal(estimate_foreground(photo, alpha8), whole)


def test_rendered_outputs_with_guided_refinement_share_one_alpha(tmp_path):
    photo, alpha, _ = composite(60, 80)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    source = buffer.getvalue()
    prob = cv2.resize(alpha, (32, 32), interpolation=cv2.INTER_AREA)

    def render(fmt, refine):
        return render_output(prob, 60, 80, fmt=fmt, threshold=0.4, source=source, refine=refine)

    mask = decode_mask(render("mask", "guided"))
    assert np.array_equal(mask, refine_mask(prob, photo, np.asarray(upsample(prob, 60, 80))))
    assert not np.array_equal(mask, decode_mask(render("mask", "none")))
    assert np.array_equal(decode_mask(render("binary", "guided")), np.where(mask >= 0.4 * 255, 255, 0))
    cutout = np.asarray(Image.open(io.BytesIO(render("rgba", "guided"))))
    assert np.array_equal(cutout[..., 3], mask)
    assert np.array_equal(cutout[..., :3], estimate_foreground(photo, mask))
    plain_cutout = np.asarray(Image.open(io.BytesIO(render("rgba", "none"))))
    assert np.array_equal(plain_cutout[..., :3], decode_image(source))  # today's exact pixels
    assert [default_refine(f) for f in ("mask", "binary", "rgba")] == ["none", "none", "guided"]
    with pytest.raises(ValueError, match="unknown refine"):
        render("mask", "matting")
    with pytest.raises(ValueError, match="needs the image's bytes"):
        render_output(prob, 60, 80, fmt="mask", refine="guided")
