"""Generated image collections for the bulk-masking tests: nested folders, duplicate names, every
format and colour mode the job must handle, and the bad inputs it must survive."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

import basnet.imaging  # noqa: F401  (registers pillow-heif's HEIF opener and saver with Pillow)

# Images above this many pixels are refused by the tests' runs (--max-pixels).
MAX_PIXELS = 10_000


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth gradient with a bright ellipse: compresses like a photo, has an obvious object."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 120, 3) + (yy / height)[..., None] * rng.uniform(-30, 30, 3)
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    inside = ((yy - cy) / (0.3 * height)) ** 2 + ((xx - cx) / (0.3 * width)) ** 2 < 1
    image = np.where(inside[..., None], rng.uniform(180, 255, 3), base)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rotated(height: int, width: int, seed: int, fmt: str, **kwargs) -> bytes:
    """Stored ``height x width`` with EXIF orientation 6 (rotate 90), so it shows ``width x height``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(picture(height, width, seed)), fmt, exif=exif.tobytes(), **kwargs)


def cmyk_jpeg(height: int, width: int, seed: int) -> bytes:
    return encode(Image.fromarray(picture(height, width, seed)).convert("CMYK"), "JPEG")


def sixteen_bit_png(height: int, width: int, seed: int) -> bytes:
    grey = picture(height, width, seed)[..., 0].astype(np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


# relative input path -> (bytes factory, displayed (height, width)); a/x.jpg and b/x.jpg share a
# name, c/z.bmp and c/z.webp share a stem.
def valid_files() -> dict[str, tuple[bytes, tuple[int, int]]]:
    rgb = lambda h, w, s, fmt, **kw: encode(Image.fromarray(picture(h, w, s)), fmt, **kw)  # noqa: E731
    rgba = np.dstack([picture(33, 45, 3), np.full((33, 45), 200, np.uint8)])
    return {
        "a/x.jpg": (rgb(40, 48, 1, "JPEG", quality=90), (40, 48)),
        "b/x.jpg": (rgb(48, 40, 2, "JPEG", quality=90), (48, 40)),
        "a/deep/er/y.PNG": (encode(Image.fromarray(rgba), "PNG"), (33, 45)),
        "gray.jpg": (encode(Image.fromarray(picture(37, 29, 4)[..., 1]), "JPEG"), (37, 29)),
        "exif.jpg": (rotated(24, 40, 5, "JPEG", progressive=True), (40, 24)),
        "sixteen.png": (sixteen_bit_png(30, 50, 6), (30, 50)),
        "c/z.bmp": (rgb(28, 44, 7, "BMP"), (28, 44)),
        "c/z.webp": (rgb(36, 36, 8, "WEBP"), (36, 36)),
        "d/w.TIFF": (rgb(32, 32, 9, "TIFF"), (32, 32)),
        "phone/IMG_0001.HEIC": (rotated(30, 44, 12, "HEIF"), (44, 30)),  # pillow-heif, EXIF-rotated
        "web/pic.avif": (rgb(34, 26, 13, "AVIF"), (34, 26)),
        "print/cmyk.jpg": (cmyk_jpeg(26, 38, 14), (26, 38)),
        "cam/DSC_0002.JPG": (rgb(30, 30, 15, "JPEG"), (30, 30)),
    }


# Where each valid input's mask goes (z.webp loses the stem collision to z.bmp, first in order).
EXPECTED_OUTPUTS = {
    "a/x.jpg": "a/x.png", "b/x.jpg": "b/x.png", "a/deep/er/y.PNG": "a/deep/er/y.png",
    "gray.jpg": "gray.png", "exif.jpg": "exif.png", "sixteen.png": "sixteen.png",
    "c/z.bmp": "c/z.png", "c/z.webp": "c/z.webp.png", "d/w.TIFF": "d/w.png",
    "phone/IMG_0001.HEIC": "phone/IMG_0001.png", "web/pic.avif": "web/pic.png", "print/cmyk.jpg": "print/cmyk.png",
    "cam/DSC_0002.JPG": "cam/DSC_0002.png",
}


def bad_files() -> dict[str, bytes]:
    """Relative path -> bytes of inputs that must be recorded as failed (with --max-pixels MAX_PIXELS)."""
    jpeg = encode(Image.fromarray(picture(40, 40, 10)), "JPEG")
    return {
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad/text.png": b"this is not an image\n",
        "bad/huge.png": encode(Image.fromarray(picture(120, 120, 11)), "PNG"),
    }


def write_collection(root: str) -> dict[str, tuple[int, int]]:
    """Writes the valid and bad files (and a non-image file) under ``root``; returns valid sizes."""
    files = {rel: data for rel, (data, _) in valid_files().items()} | bad_files()
    files["notes.txt"] = b"not an image: listed, counted, never masked\n"
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return {rel: size for rel, (_, size) in valid_files().items()}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str) -> None:
    """A tar shard with normal, nested, hostile, absolute, odd-character, sidecar and link members."""
    jpeg = lambda s: encode(Image.fromarray(picture(36, 44, s)), "JPEG")  # noqa: E731
    with tarfile.open(path, "w") as tar:
        add_member(tar, "img/p.jpg", jpeg(20))
        add_member(tar, "img/q.png", encode(Image.fromarray(picture(30, 30, 21)), "PNG"))
        add_member(tar, "../../x.jpg", jpeg(22))
        add_member(tar, "/abs/y.jpg", jpeg(23))
        add_member(tar, "odd\x01name?.jpg", jpeg(24))
        add_member(tar, "img/p.json", b"{}")
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
