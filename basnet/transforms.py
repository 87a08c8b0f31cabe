"""Image and mask transforms on decoded arrays: resize, the paper's random crop and flip, and
the normalisation statistics.

Everything here works on numpy arrays (uint8, HxWx3 images and HxW masks) with Pillow and knows
nothing of Ray or torch, so the same code runs in light Ray Data tasks (which never import
torch), in the predictor, in the server and in tests. Decoding, rendering and encoding are
``basnet.imaging``; the model's tensors are made in ``basnet.device``.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, tuple[int, int]]



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
