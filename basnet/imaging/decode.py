"""Decoding every photo format a user has into the arrays the model and the renderers take.

Formats are one table (:data:`FORMATS_BY_SUFFIX`): JPEG (baseline, progressive, CMYK), PNG (8 and
16 bit), WebP, AVIF and TIFF through Pillow itself, BMP, and HEIC/HEIF through pillow-heif, whose
opener is registered here, once, for the whole process. Suffixes match whatever their case.

Policy (one place, so training, masking, serving and evaluation agree):

* EXIF orientation is applied, so arrays match what an image viewer shows (and the sizes a mask is
  rendered at are the oriented ones).
* Alpha is dropped, not composited: RGBA, LA and PA images keep their colour values.
* 16-bit images (``I;16*`` and ``I``) are scaled from 0..65535 to 0..255 (rounded, not clipped),
  float images (``F``) from 0..1 when all values lie there, else clipped to 0..255.
* The pixel count is checked from the header, before any pixel is decoded, against ``max_pixels``
  (:data:`DEFAULT_MAX_PIXELS` when not given). Pillow's own decompression-bomb limit, which would
  refuse a 180 MP camera file whatever the caller allows, is replaced by this check.
* **Reduced decoding** (:func:`decode_for_model`): a JPEG bound for the model's side S is decoded by
  libjpeg-turbo in the DCT domain at the smallest scale (1/2, 1/4 or 1/8) that still leaves at
  least ``REDUCED_DECODE_FACTOR`` x S pixels on each side, then resized to S as any other image. A
  12 MP photo then reaches 256 px for a fraction of a full decode; the masks stay within the
  figures in docs/infer.md ("Reduced decoding"). Other formats decode at full size.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["FORMATS_BY_SUFFIX", "IMAGE_SUFFIXES", "DEFAULT_MAX_PIXELS", "REDUCED_DECODE_FACTOR", "HEIF_SUPPORT",
           "ImageDecodeError", "ImageTooLargeError", "Decoded", "has_image_suffix", "image_suffix", "open_image",
           "decode_image", "decode_rgb", "decode_mask", "decode_for_model"]

# What each suffix is, for listing and for messages; Pillow identifies the bytes themselves.
FORMATS_BY_SUFFIX = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
    ".png": "PNG", ".webp": "WebP", ".avif": "AVIF", ".heic": "HEIC", ".heif": "HEIF",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
}
IMAGE_SUFFIXES = tuple(FORMATS_BY_SUFFIX)

# A 200 MP camera file is accepted; above it a caller must say so (``--max-pixels``).
DEFAULT_MAX_PIXELS = 200_000_000
# The draft decode keeps at least this many times the model's side: measured in docs/infer.md.
REDUCED_DECODE_FACTOR = 2

Image.MAX_IMAGE_PIXELS = None  # replaced by the header check below, which the caller's limit decides

try:  # HEIC from iPhones; a node without pillow-heif still decodes everything else
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORT = True
except ImportError:  # pragma: no cover - pillow-heif is a dependency; GPU images built from wheels may lack it
    HEIF_SUPPORT = False

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1")


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded into an image; the message says why in a few words."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (``max_pixels``)."""


@dataclass(frozen=True)
class Decoded:
    """An image as the model takes it (``image``, uint8 S x S x 3) and the size its mask is rendered
    at (``height`` x ``width``, the full image after EXIF orientation)."""

    image: np.ndarray
    height: int
    width: int


def image_suffix(name: str) -> str:
    """The name's suffix, lower case, if it is an image's (``""`` otherwise)."""
    dot = name.rfind(".")
    suffix = name[dot:].lower() if dot >= 0 else ""
    return suffix if suffix in FORMATS_BY_SUFFIX else ""


def has_image_suffix(name: str) -> bool:
    """Whether ``name`` ends with one of :data:`IMAGE_SUFFIXES`, ignoring case."""
    return bool(image_suffix(name))


def _unidentified(data: bytes) -> ImageDecodeError:
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS and not HEIF_SUPPORT:
        return ImageDecodeError("HEIC/HEIF needs pillow-heif on this node: pip install pillow-heif")
    return ImageDecodeError("not a recognised image format")


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Opens (reads the header only) and size-checks an image.

    Raises:
        ImageDecodeError: Empty, not an image, a corrupt header; ``ImageTooLargeError`` above the limit.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as exc:  # Pillow plugins raise many types on corrupt headers
        raise ImageDecodeError(f"corrupt image header ({exc})") from None
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    width, height = img.size
    if width * height > limit:
        raise ImageTooLargeError(f"image is {width} x {height} = {width * height} pixels, above --max-pixels {limit}")
    return img


def _load(img: Image.Image) -> Image.Image:
    try:
        # load() inside the try so a truncated file fails here instead of yielding grey pixels.
        img.load()
    except Exception as exc:  # OSError, SyntaxError, zlib.error, struct.error ... depending on format
        raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from None
    return img


def oriented(img: Image.Image) -> Image.Image:
    """Rotated/flipped as the EXIF orientation says; a broken EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # the pixels decoded fine; losing the photo over its metadata is worse
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return img


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as shown, from the header (EXIF orientations 5-8 swap the sides)."""
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _gray_to_uint8(img: Image.Image) -> np.ndarray | None:
    """An 8-bit (H, W) array for single-channel modes, ``None`` for colour modes."""
    if img.mode == "L":
        return _as_array(img)
    if img.mode in ("1", "LA", "La"):
        return _as_array(_convert(img, "L"))
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        # Round to nearest so 65535 -> 255 and 32768 -> 128 (a plain >> 8 would floor).
        return ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return None


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """``img.convert(mode)`` with palette transparency handled and failures as ImageDecodeError."""
    if img.mode == mode:
        return img
    try:
        if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")  # through RGBA: no warning about byte transparency in palettes
        return img.convert(mode)
    except ValueError as exc:
        raise ImageDecodeError(f"unsupported colour mode {img.mode} ({exc})") from None


def _as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).copy()


def _rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image of a loaded, oriented one (grey, 16-bit and float modes scaled as documented)."""
    gray = _gray_to_uint8(img)
    if gray is not None:
        return Image.fromarray(gray).convert("RGB")
    return _convert(img, "RGB")


def decode_rgb(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """:func:`decode_image` as an 8-bit RGB Pillow image (no array copy), for the renderers."""
    return _rgb(oriented(_load(open_image(data, max_pixels))))


def decode_image(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decodes encoded image bytes into an RGB array at full size.

    Args:
        data: The file's bytes (any format of :data:`FORMATS_BY_SUFFIX`).
        max_pixels: Refuse images with more pixels (width * height), from the header, before decoding;
            ``None``: :data:`DEFAULT_MAX_PIXELS`.

    Returns:
        ``uint8`` array of shape (H, W, 3), EXIF orientation applied.

    Raises:
        ImageDecodeError: Empty, truncated, corrupt, non-image or oversized input.
    """
    return _as_array(decode_rgb(data, max_pixels=max_pixels))


def decode_mask(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decodes encoded mask bytes into a single-channel array: grey masks keep their (soft)
    values, 16-bit masks are scaled to 8 bits, colour masks become luminance.

    Returns:
        ``uint8`` array of shape (H, W).

    Raises:
        ImageDecodeError: Empty, truncated, corrupt, non-image or oversized input.
    """
    img = oriented(_load(open_image(data, max_pixels)))
    gray = _gray_to_uint8(img)
    if gray is not None:
        return gray
    return _as_array(_convert(_convert(img, "RGB"), "L"))


def decode_for_model(data: bytes, side: int, *, max_pixels: int | None = None, reduced: bool = True) -> Decoded:
    """An image as the model takes it: decoded (reduced for a large JPEG), oriented, resized to ``side``.

    Args:
        data: The file's bytes.
        side: The model's input side S.
        max_pixels: As in :func:`decode_image`.
        reduced: Decode a JPEG at the smallest DCT scale leaving ``REDUCED_DECODE_FACTOR`` x S per side
            (``False``: the full decode, as the test protocol resizes the full image).

    Returns:
        The S x S x 3 uint8 image and the full image's oriented height and width.

    Raises:
        ImageDecodeError: Empty, truncated, corrupt, non-image or oversized input.
    """
    img = open_image(data, max_pixels)
    height, width = _oriented_size(img)
    if reduced and img.format == "JPEG":
        wanted = REDUCED_DECODE_FACTOR * side
        img.draft(None, (wanted, wanted))  # libjpeg-turbo scales in the DCT domain; no-op if already small
    img = _rgb(oriented(_load(img)))
    if (img.width - img.height) * (width - height) < 0:  # the orientation the pixels show decides
        height, width = width, height
    resized = img.resize((side, side), Image.Resampling.BILINEAR) if img.size != (side, side) else img
    return Decoded(np.asarray(resized, dtype=np.uint8).copy(), height, width)
