"""Image and mask transforms: decode, resize, random crop/flip, normalise, encode.

Everything here works on numpy arrays (uint8, HxWx3 images and HxW masks) with Pillow and knows
nothing of Ray or torch, so the same code runs in light Ray Data tasks (which never import
torch), in the predictor, in the server and in tests. The model's tensors are made in
``basnet.device``.

Decoding policy (one place, so training, inference and evaluation agree):

* EXIF orientation is applied, so arrays match what an image viewer shows.
* Alpha is dropped, not composited: RGBA, LA and PA images keep their colour values. Salient
  object datasets store opaque photos; a cut-out with a transparent background still shows its
  object against whatever colour sits under the alpha.
* 16-bit images (``I;16*`` and ``I``) are scaled from 0..65535 to 0..255 (not clipped), float
  images (``F``) from 0..1 when all values lie there, else clipped to 0..255.
* Pixel counts are checked against ``max_pixels`` from the header, before any pixel is decoded.
  Pillow's own decompression-bomb limit (about 179 M pixels) still applies on top.
"""

from __future__ import annotations

import io
import logging
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, tuple[int, int]]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded into an image; the message says why in a few words."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed (``max_pixels``, or Pillow's decompression-bomb limit)."""


def has_image_suffix(name: str) -> bool:
    """Whether ``name`` ends with one of :data:`IMAGE_SUFFIXES`, ignoring case."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def decode_image(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes into an RGB array.

    Args:
        data: The file's bytes (JPEG, PNG, WebP, BMP, TIFF ...).
        max_pixels: Refuse images with more than this many pixels (width * height); checked
            from the header before decoding. ``None`` keeps only Pillow's own limit.

    Returns:
        ``uint8`` array of shape (H, W, 3), EXIF orientation applied.

    Raises:
        ImageDecodeError: Empty, truncated, corrupt, non-image or oversized input.
    """
    img = _open_image(data, max_pixels)
    gray = _gray_to_uint8(img)
    if gray is not None:
        return np.repeat(gray[:, :, None], 3, axis=2)
    return _as_array(_convert(img, "RGB"))


def decode_mask(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded mask bytes into a single-channel array.

    Grayscale masks keep their (soft) values, 16-bit masks are scaled to 8 bits and colour masks
    are converted to luminance.

    Args:
        data: The file's bytes, usually an 8-bit grayscale PNG.
        max_pixels: As in :func:`decode_image`.

    Returns:
        ``uint8`` array of shape (H, W).

    Raises:
        ImageDecodeError: Empty, truncated, corrupt, non-image or oversized input.
    """
    img = _open_image(data, max_pixels)
    gray = _gray_to_uint8(img)
    if gray is not None:
        return gray
    return _as_array(_convert(_convert(img, "RGB"), "L"))


def _open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open, size-check, fully load and orient an image, mapping every failure to ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Exception as exc:  # Pillow plugins raise many types on corrupt headers
        raise ImageDecodeError(f"corrupt image header ({exc})") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width} x {height} = {width * height} pixels, above --max-pixels {max_pixels}"
        )
    try:
        # load() inside the try so a truncated file fails here instead of yielding grey pixels.
        img.load()
    except Exception as exc:  # OSError, SyntaxError, zlib.error, struct.error ... depending on format
        raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from None
    return _apply_exif_orientation(img)


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation says; a broken EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # the pixels decoded fine; losing the photo over its metadata is worse
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return img


def _gray_to_uint8(img: Image.Image) -> np.ndarray | None:
    """Return an 8-bit (H, W) array for single-channel modes, ``None`` for colour modes."""
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
            # Going through RGBA avoids Pillow's warning about byte transparency in palettes.
            img = img.convert("RGBA")
        return img.convert(mode)
    except ValueError as exc:
        raise ImageDecodeError(f"unsupported colour mode {img.mode} ({exc})") from None


def _as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8).copy()


def _hw(size: Size) -> tuple[int, int]:
    """Normalise a size argument to (height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(height), int(width)


def _resize(array: np.ndarray, size: Size) -> np.ndarray:
    height, width = _hw(size)
    if array.shape[:2] == (height, width):
        return array.copy()
    resized = Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=array.dtype).copy()


def resize_image(img: np.ndarray, size: Size) -> np.ndarray:
    """Resize an image bilinearly (Pillow, antialiased when shrinking); aspect ratio not kept.

    Args:
        img: ``uint8`` array (H, W, 3).
        size: Target side (square) or (height, width).

    Returns:
        ``uint8`` array (height, width, 3).
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
    return _resize(img, size)


def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """Resize a mask bilinearly, so soft edges stay soft.

    Args:
        mask: ``uint8`` or ``float32`` array (H, W); float maps (probabilities) are resized
            before any quantisation.
        size: Target side (square) or (height, width).

    Returns:
        Array (height, width) of the input's dtype.
    """
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.float32):
        raise ValueError(f"expected uint8 or float32 (H, W), got {mask.dtype} {mask.shape}")
    return _resize(mask, size)


def random_crop_flip(
    image: np.ndarray, mask: np.ndarray, crop: Size, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's augmentation: one random crop window for both, then a horizontal flip (p=0.5).

    Args:
        image: Array (H, W, C).
        mask: Array (H, W), same H and W as ``image``.
        crop: Crop side (square) or (height, width); must fit inside the image.
        rng: Source of randomness, so workers can be seeded.

    Returns:
        The cropped (and maybe flipped) image and mask, C-contiguous.
    """
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} sizes differ")
    crop_h, crop_w = _hw(crop)
    height, width = mask.shape[:2]
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_h}x{crop_w} larger than image {height}x{width}")
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    image = image[top : top + crop_h, left : left + crop_w]
    mask = mask[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    # Contiguous copies: negative strides would break torch.from_numpy downstream.
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def random_crop_flip_batch(batch: dict[str, np.ndarray], crop: Size, rng: np.random.Generator
                           ) -> dict[str, np.ndarray]:
    """:func:`random_crop_flip` for every image/mask pair of a batch (``image`` NHWC, ``mask`` NHW)."""
    pairs = [random_crop_flip(image, mask, crop, rng) for image, mask in zip(batch["image"], batch["mask"])]
    if not pairs:
        height, width = _hw(crop)
        return {"image": np.zeros((0, height, width, 3), np.uint8), "mask": np.zeros((0, height, width), np.uint8)}
    return {"image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs])}


def encode_png(array: np.ndarray) -> bytes:
    """Encode a uint8 array as PNG bytes (no metadata, so equal arrays give equal bytes).

    Args:
        array: ``uint8`` (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA.

    Returns:
        The PNG file's bytes.
    """
    channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype != np.uint8 or not channels_ok:
        raise ValueError(f"expected uint8 (H, W), (H, W, 3) or (H, W, 4), got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


FORMATS = ("mask", "binary", "rgba")  # what a saliency map is rendered as


def to_grey(prob: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit grey levels, rounded to nearest."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def render_output(prob: np.ndarray, height: int, width: int, *, fmt: str, threshold: float = 0.5,
                  source: bytes = b"") -> bytes:
    """The output PNG for one saliency map, at the image's original size (the test protocol's last step).

    Args:
        prob: float (S, S) saliency in [0, 1] (sigmoid of the refined output, min-max normalised).
        height, width: The original image's size (after EXIF rotation).
        fmt: ``mask`` (8-bit soft), ``binary`` (0 or 255 at ``threshold``) or ``rgba`` (the
            decoded image with the soft mask as alpha; needs ``source``, the image's bytes).
        threshold: Saliency threshold of ``binary``.
        source: The image's encoded bytes, for ``rgba``.

    Returns:
        PNG bytes.
    """
    full = resize_mask(np.asarray(prob, np.float32), (height, width))  # bilinear, before quantising
    if fmt == "binary":
        return encode_png(np.where(full >= threshold, 255, 0).astype(np.uint8))
    mask = to_grey(full)
    if fmt == "mask":
        return encode_png(mask)
    if fmt == "rgba":
        image = decode_image(source)
        if image.shape[:2] != mask.shape:
            raise ImageDecodeError(f"image decoded as {image.shape[:2]}, expected {mask.shape}")
        return encode_png(np.dstack([image, mask]))
    raise ValueError(f"unknown format {fmt!r}")
