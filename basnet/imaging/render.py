"""Rendering a saliency map at the image's full size: a mask, a binary mask or an RGBA cut-out.

The test protocol's last step takes the model's S x S map back to the original size bilinearly, in
floats, and quantises it. Images up to ``EXACT_MAX_PIXELS`` (every image of the standard benchmarks,
so evaluation figures stay the protocol's) take exactly that path; its float32 copy is at most 2 MB.
Larger photos are quantised to 8 bits at S x S and upsampled on 8-bit pixels (Pillow's fixed-point
bilinear filter): no float32 copy of a 12 or 100 MP image is ever made, and the grey levels stay
within one of the float path's (measured in docs/infer.md, "Full-resolution photos").

``refine="guided"`` takes the map to full size with the photo as the guide instead
(:mod:`basnet.imaging.refine`), and an RGBA cut-out then gets estimated foreground colours at its
edges; ``"none"`` is the plain path above, exactly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from basnet.imaging.decode import ImageDecodeError, decode_rgb
from basnet.imaging.encode import encode
from basnet.imaging.refine import REFINES, estimate_foreground, refine_mask
from basnet.transforms import resize_mask

__all__ = ["EXACT_MAX_PIXELS", "FORMATS", "REFINES", "to_grey", "upsample", "render_output", "default_refine"]

FORMATS = ("mask", "binary", "rgba")  # what a saliency map is rendered as
EXACT_MAX_PIXELS = 512 * 1024  # up to here the float path; benchmark images are at most 0.2 MP


def to_grey(prob: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit grey levels, rounded to nearest."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def upsample(prob: np.ndarray, height: int, width: int, threshold: float | None = None) -> Image.Image:
    """The map as an 8-bit grey image of ``height`` x ``width``, or with ``threshold`` as 0 or 255
    where the map is below or at least ``threshold``.

    Up to ``EXACT_MAX_PIXELS`` bilinear in floats, then quantised (the protocol exactly); above it
    quantised first, then bilinear on 8 bits."""
    prob = np.asarray(prob, np.float32)
    if height * width <= EXACT_MAX_PIXELS:
        full = prob if prob.shape == (height, width) else resize_mask(prob, (height, width))
        if threshold is not None:
            return Image.fromarray(np.where(full >= threshold, 255, 0).astype(np.uint8))
        return Image.fromarray(to_grey(full))
    grey = Image.fromarray(to_grey(prob))
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.BILINEAR)
    if threshold is None:
        return grey
    cut = threshold * 255.0
    return grey.point([255 if level >= cut else 0 for level in range(256)])


def _photo(source: bytes, max_pixels: int | None, height: int, width: int) -> Image.Image:
    """The source image at full size, oriented, checked against the size the map is rendered at."""
    image = decode_rgb(source, max_pixels=max_pixels)
    if image.size != (width, height):
        raise ImageDecodeError(f"image decoded as {image.height} x {image.width}, expected {height} x {width}")
    return image


def default_refine(fmt: str) -> str:
    """``guided`` for cut-outs (measured better, docs/infer.md); masks keep the test protocol's plain path."""
    return "guided" if fmt == "rgba" else "none"


def render_output(prob: np.ndarray, height: int, width: int, *, fmt: str, threshold: float = 0.5,
                  source: bytes = b"", encoding: str = "png", max_pixels: int | None = None,
                  refine: str = "none") -> bytes:
    """The output file for one saliency map, at the image's original size (the protocol's last step).

    Args:
        prob: float (S, S) saliency in [0, 1] (sigmoid of the refined output, min-max normalised).
        height, width: The original image's size (after EXIF orientation).
        fmt: ``mask`` (8-bit soft), ``binary`` (0 or 255 at ``threshold``) or ``rgba`` (the decoded
            image with the soft mask as alpha; needs ``source``, the image's bytes).
        threshold: Saliency threshold of ``binary``.
        source: The image's encoded bytes, for ``rgba`` and for ``refine="guided"``.
        encoding: ``basnet.imaging.encode.ENCODINGS`` (lossless; ``webp`` for cut-outs).
        max_pixels: The pixel limit the source was decoded under.
        refine: ``none`` (plain bilinear upsampling; a cut-out keeps the photo's colours) or
            ``guided`` (the photo guides the upsampling; a cut-out gets estimated foreground colours).

    Returns:
        The encoded file's bytes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    if refine not in REFINES:
        raise ValueError(f"unknown refine {refine!r}")
    if refine == "guided":
        return _render_guided(prob, height, width, fmt=fmt, threshold=threshold, source=source, encoding=encoding,
                              max_pixels=max_pixels)
    if fmt == "binary":
        return encode(upsample(prob, height, width, threshold), encoding)
    mask = upsample(prob, height, width)
    if fmt == "mask":
        return encode(mask, encoding)
    image = _photo(source, max_pixels, height, width)
    image.putalpha(mask)
    return encode(image, encoding)


def _render_guided(prob: np.ndarray, height: int, width: int, *, fmt: str, threshold: float, source: bytes,
                   encoding: str, max_pixels: int | None) -> bytes:
    if not source:
        raise ValueError("refine guided needs the image's bytes (source) as its guide")
    photo = np.asarray(_photo(source, max_pixels, height, width))
    alpha = refine_mask(np.asarray(prob, np.float32), photo, np.asarray(upsample(prob, height, width)))
    if fmt == "mask":
        return encode(alpha, encoding)
    if fmt == "binary":  # the refined 8-bit alpha at the threshold (the plain path compares floats up to 0.5 MP)
        return encode(np.where(alpha >= threshold * 255.0, 255, 0).astype(np.uint8), encoding)
    return encode(np.dstack([estimate_foreground(photo, alpha), alpha]), encoding)
