"""A small synthetic dataset in the DUTS layout, generated deterministically on demand.

It lets every tool (training, inference, evaluation, tuning) run end to end without a download.
Most images hold one salient object (an ellipse, polygon or rounded box with thin handles,
antennae or a ring) in saturated colours over a muted, textured background (gradient, stripes,
noise, faint blobs); one in eight is a scene without an object (background only, an empty mask),
so a model trained on it learns to say that a scene is empty. Masks are drawn at 4x and
box-filtered down, so their edges carry soft values the way DUTS masks do. See ``docs/sample.md``.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from basnet import storage
from basnet.errors import DataError
from basnet.imaging import encode_png

logger = logging.getLogger(__name__)

SAMPLE_VERSION = 2  # 2: scenes without an object, the contrast option
MARKER = "sample.json"  # written last: its presence means the sample is complete
_SUPERSAMPLE = 4
_JPEG_QUALITY = 90

Size = Union[int, tuple[int, int]]
EMPTY_EVERY = 8  # every 8th image of each split (index 7, 15, ...) is a scene without an object
DEFAULTS = {"n_train": 48, "n_test": 16, "size": (64, 80), "seed": 0, "empty_every": EMPTY_EVERY,
            "contrast": (1.0, 1.0)}


def default_sample_dir() -> str:
    """``$BASNET_SAMPLE_DIR``, else ``~/.cache/basnet-ray/sample-v2``."""
    configured = os.environ.get("BASNET_SAMPLE_DIR")
    if configured:
        return configured
    return os.path.join(os.path.expanduser("~"), ".cache", "basnet-ray", f"sample-v{SAMPLE_VERSION}")


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val), dtype=np.float32) * 255.0


def _grid(height: int, width: int, angle: float) -> np.ndarray:
    """Coordinates along direction ``angle``, scaled to roughly [0, 1] across the image."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    return (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Muted two-colour gradient + stripes + faint blobs + noise, float32 (H, W, 3) in 0..255."""
    hue = rng.random()
    start = _hsv(hue, rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.75))
    end = _hsv(hue + rng.uniform(-0.2, 0.2), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.75))
    t = _grid(height, width, rng.uniform(0, 2 * np.pi))[..., None]
    img = start * (1 - t) + end * t
    period = rng.uniform(4.0, 14.0) / max(height, width)
    stripes = np.sin(2 * np.pi * _grid(height, width, rng.uniform(0, np.pi)) / period)
    img += rng.uniform(6.0, 20.0) * stripes[..., None]
    img += _blobs(height, width, rng)
    img += rng.normal(0.0, rng.uniform(6.0, 14.0), size=img.shape)
    return img


def _blobs(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Up to three blurred, low-contrast grey blobs: clutter that is not salient."""
    layer = Image.new("L", (width, height), 128)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.1, 0.3) * min(height, width)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(rng.integers(100, 157)))
    blurred = layer.filter(ImageFilter.GaussianBlur(radius=3))
    return (np.asarray(blurred, dtype=np.float32) - 128.0)[..., None]


def _body(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float,
          rng: np.random.Generator) -> None:
    """The object's main shape: ellipse, star-ish polygon or rounded box."""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    elif kind == 1:
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(0.55, 1.0, n)
        points = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(points, fill=255)
    else:
        corner = int(min(rx, ry) * rng.uniform(0.1, 0.6))
        draw.rounded_rectangle((cx - rx, cy - ry, cx + rx, cy + ry), radius=corner, fill=255)


def _thin_parts(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float,
                rng: np.random.Generator) -> None:
    """Antennae with knobs and, sometimes, a ring handle: fine structure for the boundary loss."""
    s = _SUPERSAMPLE
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, 2 * np.pi)
        reach = rng.uniform(1.3, 1.9)
        end = (cx + rx * reach * np.cos(angle), cy + ry * reach * np.sin(angle))
        draw.line([(cx, cy), end], fill=255, width=int(rng.integers(3, 7)))  # 0.75-1.5 px
        knob = rng.uniform(1.0, 2.5) * s  # 1-2.5 px
        draw.ellipse((end[0] - knob, end[1] - knob, end[0] + knob, end[1] + knob), fill=255)
    if rng.random() < 0.4:
        side = 1 if rng.random() < 0.5 else -1
        hx, hr = cx + side * rx, ry * rng.uniform(0.35, 0.6)
        draw.ellipse((hx - hr, cy - hr, hx + hr, cy + hr), outline=255, width=int(rng.integers(4, 9)))


def _object_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Soft uint8 (H, W) mask: shapes drawn at 4x, then box-filtered (area coverage) down."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    short = min(height, width) * s
    rx, ry = short * rng.uniform(0.17, 0.36), short * rng.uniform(0.17, 0.36)
    cx = rng.uniform(0.3, 0.7) * width * s
    cy = rng.uniform(0.3, 0.7) * height * s
    _body(draw, cx, cy, rx, ry, rng)
    _thin_parts(draw, cx, cy, rx, ry, rng)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.uint8)


def _foreground(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Saturated, bright colour with shading and spots, float32 (H, W, 3) in 0..255."""
    hue = rng.random()
    base = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    accent = _hsv(hue + rng.uniform(0.05, 0.2), rng.uniform(0.6, 1.0), rng.uniform(0.55, 0.9))
    shade = 0.8 + 0.3 * _grid(height, width, rng.uniform(0, 2 * np.pi))[..., None]
    spots = np.sin(_grid(height, width, rng.uniform(0, np.pi)) * rng.uniform(10, 30)) > 0.6
    img = np.where(spots[..., None], accent, base) * shade
    return img + rng.normal(0.0, 3.0, size=img.shape)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Fixed quality and subsampling, no EXIF or timestamps: same arguments, same bytes.
    Image.fromarray(image).save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=2)
    return buffer.getvalue()


def make_example(height: int, width: int, rng: np.random.Generator, *, empty: bool = False,
                 contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (image uint8 (H, W, 3), soft mask uint8 (H, W)) pair.

    ``empty``: a scene without an object (the background alone, an all-zero mask). ``contrast``
    in [0, 1]: how far the object's colours stand out from the background behind it (1: the
    saturated colours as drawn; 0: the background itself, an object no model can see).
    """
    if empty:
        background = _background(height, width, rng)
        return np.clip(np.rint(background), 0, 255).astype(np.uint8), np.zeros((height, width), np.uint8)
    mask = _object_mask(height, width, rng)
    alpha = mask.astype(np.float32)[..., None] / 255.0
    background = _background(height, width, rng)
    foreground = _foreground(height, width, rng)
    if contrast < 1.0:
        foreground = background + contrast * (foreground - background)
    # Composite like a matte, so the image's edges blend exactly as the mask's soft values say.
    image = background * (1 - alpha) + foreground * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def is_empty_scene(index: int, empty_every: int) -> bool:
    """Whether image ``index`` of a split is a scene without an object (``empty_every`` 0: none is)."""
    return empty_every > 0 and index % empty_every == empty_every - 1


def _write_split(root: str, split: str, count: int, size: tuple[int, int], seed: int, empty_every: int,
                 contrast: tuple[float, float]) -> None:
    tag = "TR" if split == "train" else "TE"
    image_dir = storage.join(root, f"DUTS-{tag}", f"DUTS-{tag}-Image")
    mask_dir = storage.join(root, f"DUTS-{tag}", f"DUTS-{tag}-Mask")
    for i in range(count):
        # One generator per image, keyed by split and index, so the two splits are independent.
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        height = size[0] + int(rng.integers(-4, 5))
        width = size[1] + int(rng.integers(-4, 5))
        level = float(rng.uniform(*contrast)) if contrast[0] < contrast[1] else contrast[0]
        image, mask = make_example(height, width, rng, empty=is_empty_scene(i, empty_every), contrast=level)
        name = f"sample_{tag.lower()}_{i:04d}"
        storage.write_bytes(storage.join(image_dir, f"{name}.jpg"), _jpeg(image))
        storage.write_bytes(storage.join(mask_dir, f"{name}.png"), encode_png(mask))


def _params(n_train: int, n_test: int, size: Size, seed: int, empty_every: int = EMPTY_EVERY,
            contrast: tuple[float, float] = (1.0, 1.0)) -> dict:
    height, width = (size, size) if isinstance(size, int) else size
    low, high = (float(c) for c in contrast)
    if n_train < 1 or n_test < 0 or min(height, width) < 16 or empty_every < 0 or not 0 <= low <= high <= 1:
        raise ValueError(f"need n_train >= 1, n_test >= 0, sides >= 16, empty_every >= 0 and "
                         f"0 <= contrast low <= high <= 1, got {n_train}, {n_test}, {size}, {empty_every}, {contrast}")
    return {"version": SAMPLE_VERSION, "n_train": n_train, "n_test": n_test,
            "size": [int(height), int(width)], "seed": seed, "empty_every": int(empty_every),
            "contrast": [low, high]}


def generate_sample(root: str, *, n_train: int = 48, n_test: int = 16, size: Size = (64, 80), seed: int = 0,
                    empty_every: int = EMPTY_EVERY, contrast: tuple[float, float] = (1.0, 1.0)) -> str:
    """Write a synthetic DUTS-layout dataset under ``root`` (local or ``s3://``).

    Args:
        root: Where ``DUTS-TR/`` and ``DUTS-TE/`` go.
        n_train: Training pairs.
        n_test: Test pairs (``DUTS-TE``).
        size: Nominal (height, width), or one side; each image varies by up to 4 px.
        seed: Seed; the same arguments give byte-identical files.
        empty_every: Every ``empty_every``-th image of each split is a scene without an object
            (index 7, 15, ... by default: one in eight); 0 for none.
        contrast: The range each object's contrast is drawn from (see :func:`make_example`); the
            default (1, 1) draws every object at full contrast. Held-out sets for checking mask
            confidence use (0, 1): objects of every contrast, down to invisible ones.

    Returns:
        ``root``.
    """
    params = _params(n_train, n_test, size, seed, empty_every, contrast)
    hw, levels = tuple(params["size"]), tuple(params["contrast"])
    _write_split(root, "train", n_train, hw, seed, params["empty_every"], levels)
    _write_split(root, "test", n_test, hw, seed, params["empty_every"], levels)
    storage.write_bytes(storage.join(root, MARKER), json.dumps(params, sort_keys=True).encode())
    logger.info("wrote a %d + %d pair sample to %s", n_train, n_test, root)
    return root


def _reuse(root: str, params: dict) -> bool:
    """Whether ``root`` already holds a complete sample made with ``params``."""
    marker = storage.join(root, MARKER)
    if not storage.exists(marker):
        return False
    found = json.loads(storage.read_bytes(marker))
    if found != params:
        raise DataError(f"{root} holds a sample made with {found}, not {params}; "
                         "delete it or choose another folder")
    return True


def ensure_sample(root: str | None = None, **kwargs) -> str:
    """Generate the sample once and return its root; later calls reuse it.

    Locally the sample is written into a temporary sibling folder and renamed into place, so
    concurrent callers on one machine never see a half-written sample: the first rename wins
    and the others discard their copy.

    Args:
        root: Target folder (local or ``s3://``); default :func:`default_sample_dir`.
        **kwargs: Passed to :func:`generate_sample` (``n_train``, ``n_test``, ``size``, ``seed``,
            ``empty_every``, ``contrast``).

    Returns:
        The sample's root.
    """
    root = root or default_sample_dir()
    params = _params(**{**DEFAULTS, **kwargs})
    if _reuse(root, params):
        return root
    if storage.is_s3(root):
        return generate_sample(root, **kwargs)  # the marker, written last, marks completion
    _, path = storage.filesystem(root)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        generate_sample(tmp, **kwargs)
        _rename_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _reuse(root, params):
        raise DataError(f"{root} exists but is not a complete sample; "
                        "delete it or choose another folder")
    return root


def _rename_into_place(tmp: str, path: str) -> None:
    """Atomic rename; losing the race to another process (target exists, non-empty) is fine."""
    try:
        os.rename(tmp, path)
    except OSError:
        if not os.path.isdir(path):
            raise
