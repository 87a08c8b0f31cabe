"""Edge-aware masks and clean cut-out colours at full size.

**Guided upsampling** (``refine="guided"``). The model's S x S map is taken to full size with the
photo as the guide: a colour guided filter (He, Sun and Tang, TPAMI 2013) is fitted on the model's
own grid, the photo shrunk to S x S beside the map, and its per-cell linear colour model (three
gains and an offset) is upsampled bilinearly and applied to the full-size photo's colours, as the
fast guided filter (He and Sun 2015) does with a subsampling equal to the upsampling factor. An edge
then follows the photo's own edges and strands at full resolution, where plain bilinear upsampling
stretches each map cell over tens of pixels. The filter is applied only in the transition band
(the plain map strictly between ``BAND`` grey levels): elsewhere the plain map is kept, so textured
background far from the object never leaks into the alpha. Window and regularisation were chosen on
the composites of ``bench/refine.py`` (docs/infer.md, "Edges and cut-outs"): a 3 x 3-cell window
(``RADIUS`` 1) and ``EPS`` 1e-3. Larger windows, finer working grids and a filter over the whole
image all measured worse; a smaller ``EPS`` (1e-5) follows a perfect map's edges more closely but
copies the texture of an uncertain map's surroundings into the alpha (a trained 64 px model's maps
were refined for the better on 6 of 12 scenes at 1e-5, on 12 of 12 at 1e-3).

**Foreground colours** (:func:`estimate_foreground`). A semi-transparent edge pixel of a photo
holds the old background's colour mixed in; written as is, a cut-out shows a halo on any new
background. The colour is re-estimated by blur fusion (Forte and Pitie, "Approximate fast
foreground colour estimation", ICIP 2021), twice: local means of foreground and background colours
weighted by alpha, and the pixel's residual against them given back to the foreground. The first,
wide pass runs at a reduced scale; the second, narrow one at full size, in strips, on the rows that
hold partial alpha only, so memory stays a few strips, not several float copies of a 100 MP photo.

No Ray, no torch: NumPy, and OpenCV (a dependency of pysodmetrics), imported where it is used, so
that the decoders load on nodes without it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["REFINES", "RADIUS", "EPS", "BAND", "guided_coefficients", "refine_mask", "estimate_foreground"]

REFINES = ("none", "guided")
RADIUS = 1  # the guided filter's window on the model's grid: 3 x 3 map cells
EPS = 1e-3  # its regularisation (colours in [0, 1])
BAND = (5, 250)  # refined where the plain map's grey level lies strictly between these (0.02 and 0.98)
_BAND_RAMP = 6.0  # grey levels over which the refined value fades in from the band's edges (16 measured worse)
_BAND_STRIP = 512  # rows at a time

# Blur fusion's two radii as fractions of the image's longer side, and the scale the wide pass runs
# at. Forte and Pitie's code blurs with boxes of 90 and 6 px (radii 45 and 3) on images of about
# 2,000 px; on the composites of bench/refine.py wider means measured better: radii of 1/22 and 1/340
# (boxes about twice theirs) gave a colour error of 0.75x naive with the refined alpha and 0.43x
# with the true one, these 0.66x and 0.29x.
_WIDE, _NARROW = 1 / 6, 1 / 150
_WIDE_PASS_SIDE = 512
_STRIP = 256  # rows per strip of the narrow pass


def _box(x: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    return cv2.boxFilter(x, -1, (2 * radius + 1, 2 * radius + 1), normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_coefficients(guide: np.ndarray, prob: np.ndarray, radius: int = RADIUS, eps: float = EPS) -> np.ndarray:
    """The colour guided filter's mean linear model of ``prob`` on ``guide``, cell by cell.

    Args:
        guide: float32 (h, w, 3) colours in [0, 1], on the map's grid.
        prob: float32 (h, w) map.

    Returns:
        float32 (h, w, 4): the gains of R, G and B, then the offset; ``prob`` ~= gains . colour + offset.
    """
    guide, prob = np.asarray(guide, np.float32), np.asarray(prob, np.float32)
    mean_i, mean_p = _box(guide, radius), _box(prob, radius)
    cov_ip = _box(guide * prob[..., None], radius) - mean_i * mean_p[..., None]
    var = np.empty(prob.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            product = _box(guide[..., i] * guide[..., j], radius)
            var[..., i, j] = var[..., j, i] = product - mean_i[..., i] * mean_i[..., j]
    var += eps * np.eye(3, dtype=np.float32)
    gains = np.linalg.solve(var, cov_ip[..., None])[..., 0]
    offset = mean_p - np.einsum("hwc,hwc->hw", gains, mean_i)
    return np.concatenate([_box(gains, radius), _box(offset, radius)[..., None]], axis=-1).astype(np.float32)


def _source_coords(n_out: int, n_in: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling with pixel centres aligned (as OpenCV's and Pillow's resize): the two source
    indices and the second one's weight for each output ``index``."""
    pos = (index.astype(np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5
    np.clip(pos, 0, n_in - 1, out=pos)
    low = pos.astype(np.int32)
    return low, np.minimum(low + 1, n_in - 1), pos - low


def refine_mask(prob: np.ndarray, image: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """The map at full size with the photo as the guide.

    Args:
        prob: float32 (S, S) map in [0, 1], the model's grid.
        image: uint8 (H, W, 3) photo, oriented as the mask.
        plain: uint8 (H, W) the map upsampled plainly (kept outside the transition band).

    Returns:
        uint8 (H, W).
    """
    import cv2

    height, width = plain.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"guide is {image.shape[:2]}, mask {(height, width)}")
    sh, sw = prob.shape
    # The photo on the map's grid: an area average (Pillow reduces by whole factors first, faster).
    small = Image.fromarray(image).resize((sw, sh), Image.Resampling.BOX, reducing_gap=2.0)
    coef = guided_coefficients(np.asarray(small, np.float32) * np.float32(1 / 255), np.asarray(prob, np.float32))
    # The coefficients bilinearly at full size, as cv2's INTER_LINEAR (Pillow's bilinear, which made
    # the plain map, agrees when enlarging): rows for every row at once (small), then columns per
    # pixel, strip by strip, so memory stays a strip's band pixels whatever the photo's size.
    rows = cv2.resize(coef, (sw, height), interpolation=cv2.INTER_LINEAR)
    out = plain.copy()
    for top in range(0, height, _BAND_STRIP):
        strip = plain[top:top + _BAND_STRIP]
        points = cv2.findNonZero(cv2.inRange(strip, BAND[0] + 1, BAND[1] - 1))  # (N, 1, 2) x, y; None if empty
        if points is None:
            continue
        xs, ys = points[:, 0, 0], points[:, 0, 1]
        x0, x1, wx = _source_coords(width, sw, xs)
        left, right = rows[ys + top, x0], rows[ys + top, x1]
        c = left + (right - left) * wx[:, None]
        colour = image[ys + top, xs].astype(np.float32) * np.float32(1 / 255)
        refined = (np.einsum("nc,nc->n", c[:, :3], colour) + c[:, 3]) * 255
        # Near the band's edges the refined value fades into the plain one: no step where it ends.
        level = strip[ys, xs].astype(np.float32)
        weight = np.clip(np.minimum(level - BAND[0], BAND[1] - level) / _BAND_RAMP, 0, 1)
        out[top:top + _BAND_STRIP][ys, xs] = np.clip(np.rint(level + weight * (refined - level)), 0, 255)
    return out


def _blur(x: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    return cv2.blur(x, (2 * radius + 1, 2 * radius + 1), borderType=cv2.BORDER_REFLECT)


def _local_means(alpha: np.ndarray, fg: np.ndarray, bg: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Blur fusion's alpha-weighted local means of ``fg`` and ``bg``. Float32 arrays, colours
    (h, w, 3), alpha (h, w, 1)."""
    mean_a = _blur(alpha[..., 0], radius)[..., None]
    return _blur(fg * alpha, radius) / (mean_a + 1e-5), _blur(bg * (1 - alpha), radius) / (1 - mean_a + 1e-5)


def _with_residual(colour: np.ndarray, alpha: np.ndarray, fg_mean: np.ndarray, bg_mean: np.ndarray) -> np.ndarray:
    """The foreground: its local mean plus the pixel's residual against both means, in [0, 1]."""
    return np.clip(fg_mean + alpha * (colour - alpha * fg_mean - (1 - alpha) * bg_mean), 0, 1)


def _window_upsampled(small: np.ndarray, height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    """The window ``rows`` x ``cols`` of ``small`` (h, w, C) resized bilinearly to (height, width),
    computed for that window alone."""
    low, high, w = _source_coords(height, small.shape[0], np.arange(rows.start, rows.stop))
    part = small[low] * (1 - w)[:, None, None] + small[high] * w[:, None, None]
    low, high, w = _source_coords(width, small.shape[1], np.arange(cols.start, cols.stop))
    return part[:, low] * (1 - w)[None, :, None] + part[:, high] * w[None, :, None]


def estimate_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Foreground colours for a cut-out: ``image`` where alpha is 0 or 255, re-estimated between.

    Args:
        image: uint8 (H, W, 3) photo.
        alpha: uint8 (H, W) its mask.

    Returns:
        uint8 (H, W, 3).
    """
    import cv2

    height, width = alpha.shape
    partial = (alpha > 0) & (alpha < 255)
    rows = np.flatnonzero(partial.any(axis=1))
    out = image.copy()
    if not len(rows):
        return out
    long_side = max(height, width)
    # The wide pass on a reduced copy: its means are smooth on the scale of its radius anyway.
    scale = min(1.0, _WIDE_PASS_SIDE / long_side)
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    colour_s = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    alpha_s = (cv2.resize(alpha, small_size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255)[..., None]
    wide = max(1, round(long_side * _WIDE * scale))
    fg_mean_s, bg_mean_s = _local_means(alpha_s, colour_s, colour_s, wide)
    narrow = max(1, round(long_side * _NARROW))
    for start in range(int(rows[0]), int(rows[-1]) + 1, _STRIP):
        stop = min(start + _STRIP, int(rows[-1]) + 1)
        cols = np.flatnonzero(partial[start:stop].any(axis=0))
        if not len(cols):
            continue
        # The strip's partial pixels with the narrow blur's halo around them (clipped at the image's
        # borders, where the blur reflects as it would on the whole image).
        top, bottom = max(0, start - narrow), min(height, stop + narrow)
        left, right = max(0, int(cols[0]) - narrow), min(width, int(cols[-1]) + 1 + narrow)
        window = (slice(top, bottom), slice(left, right))
        colour = image[window].astype(np.float32) / 255
        a = (alpha[window].astype(np.float32) / 255)[..., None]
        fg_mean = _window_upsampled(fg_mean_s, height, width, *window)
        bg_mean = _window_upsampled(bg_mean_s, height, width, *window)
        fg = _with_residual(colour, a, fg_mean, bg_mean)  # the wide pass's result
        fg = _with_residual(colour, a, *_local_means(a, fg, bg_mean, narrow))  # the narrow pass
        inner = (slice(start - top, stop - top), slice(0, right - left))
        target = out[start:stop, left:right]
        mask = partial[start:stop, left:right]
        target[mask] = np.rint(fg[inner][mask] * 255).astype(np.uint8)
    return out
