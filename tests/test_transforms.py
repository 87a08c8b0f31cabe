"""Decoding, resizing, augmentation and normalisation on tiny arrays (no Ray)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from basnet.device import mask_to_target, to_model_input
from basnet.imaging import ImageDecodeError, ImageTooLargeError, decode_image, decode_mask, encode_png, has_image_suffix
from basnet.transforms import IMAGENET_MEAN, IMAGENET_STD, random_crop_flip, resize_image, resize_mask


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_array(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_decode_jpeg_gives_rgb_uint8_hwc():
    smooth = np.zeros((24, 40, 3), np.uint8)
    smooth[..., 0] = 200
    out = decode_image(encoded(Image.fromarray(smooth), "JPEG", quality=95))
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    assert np.abs(out.astype(int) - smooth).max() <= 3


def test_decode_png_is_lossless():
    img = rgb_array()
    np.testing.assert_array_equal(decode_image(encoded(Image.fromarray(img), "PNG")), img)


def test_decode_grayscale_repeats_into_three_channels():
    gray = rgb_array()[..., 0]
    out = decode_image(encoded(Image.fromarray(gray), "PNG"))
    assert out.shape == (24, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_decode_rgba_drops_alpha_and_keeps_colour():
    rgba = np.dstack([rgb_array(), np.zeros((24, 40), np.uint8)])  # fully transparent
    out = decode_image(encoded(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_decode_la_drops_alpha():
    la = Image.merge("LA", [Image.fromarray(rgb_array()[..., 1]), Image.new("L", (40, 24), 7)])
    out = decode_image(encoded(la, "PNG"))
    np.testing.assert_array_equal(out[..., 2], rgb_array()[..., 1])


def test_decode_palette_image_maps_colours():
    palette = Image.fromarray(rgb_array()).quantize(colors=8)
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(decode_image(encoded(palette, "PNG")), expected)


def test_decode_palette_with_transparency():
    palette = Image.fromarray(rgb_array()).quantize(colors=8)
    out = decode_image(encoded(palette, "PNG", transparency=0))
    assert out.shape == (24, 40, 3)


def test_decode_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (40, 24), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encoded(cmyk, "JPEG", quality=95))
    assert out.shape == (24, 40, 3)
    assert out[..., 0].mean() > 240 and out[..., 1].mean() < 15 and out[..., 2].mean() < 15


def test_decode_16bit_png_scales_not_clips():
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16).repeat(4, axis=0)
    data = encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    expected = np.array([0, 128, 255, 4], np.uint8)
    np.testing.assert_array_equal(decode_mask(data)[0], expected)
    np.testing.assert_array_equal(decode_image(data)[0, :, 1], expected)


def test_decode_float_image_in_unit_range_is_scaled():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32).repeat(2, axis=0)
    data = encoded(Image.fromarray(values), "TIFF")
    np.testing.assert_array_equal(decode_mask(data)[0], [0, 128, 255])


def test_decode_bilevel_image_maps_to_0_and_255():
    bits = Image.fromarray(np.array([[0, 255, 0, 255]] * 2, np.uint8)).convert("1")
    np.testing.assert_array_equal(decode_mask(encoded(bits, "PNG"))[0], [0, 255, 0, 255])


def test_decode_exif_orientation_6_transposes():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(Image.fromarray(rgb_array(24, 40)), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 24)
    assert decode_image(data).shape == (40, 24, 3)


def test_decode_mask_converts_rgb_to_luminance():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, 4:] = 255
    out = decode_mask(encoded(Image.fromarray(rgb), "PNG"))
    assert out.shape == (8, 8) and out.dtype == np.uint8
    assert (out[:, :4] == 0).all() and (out[:, 4:] == 255).all()


def test_decode_mask_keeps_soft_values():
    soft = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    np.testing.assert_array_equal(decode_mask(encoded(Image.fromarray(soft), "PNG")), soft)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_truncated_file_raises(fmt):
    data = encoded(Image.fromarray(rgb_array(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_decode_zero_bytes_raises():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(b"")


def test_decode_text_file_raises():
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_mask(b"name,value\nfoo,1\n")


def test_decode_above_max_pixels_raises_before_decoding():
    data = encoded(Image.fromarray(rgb_array(48, 64)), "JPEG")
    assert decode_image(data, max_pixels=64 * 48).shape == (48, 64, 3)
    # A truncated body still reports the size: the check runs on the header, before the pixels.
    with pytest.raises(ImageDecodeError, match=r"64 x 48 = 3072 pixels, above --max-pixels 1000"):
        decode_image(data[: len(data) // 2], max_pixels=1000)


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header chunk alone: what a size check reads, without the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + b"\x00" * 8  # the first pixel chunk, cut short: Pillow reads the header up to it
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 8) + idat + struct.pack(">I", zlib.crc32(idat)))


def test_camera_sizes_pass_the_default_pixel_limit_and_larger_ones_are_refused_from_the_header():
    # 180 MP: above Pillow's own decompression-bomb limit (179 MP), below the 200 MP default; the
    # header passes and the missing pixels are what fails.
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image data") as info:
        decode_image(png_header(15000, 12000))
    assert not isinstance(info.value, ImageTooLargeError)
    with pytest.raises(ImageTooLargeError, match=r"20001 x 10000 = 200010000 pixels, above --max-pixels 200000000"):
        decode_image(png_header(20001, 10000))


def test_has_image_suffix_ignores_case():
    assert has_image_suffix("a/B.JPG") and has_image_suffix("x.TiFf")
    assert not has_image_suffix("notes.txt")


def test_resize_image_and_mask_shapes():
    img, mask = rgb_array(24, 40), rgb_array(24, 40)[..., 0]
    assert resize_image(img, 32).shape == (32, 32, 3)
    assert resize_image(img, (16, 48)).shape == (16, 48, 3)
    assert resize_mask(mask, (16, 48)).shape == (16, 48)
    assert resize_mask(mask.astype(np.float32) / 255, 32).dtype == np.float32


def test_resize_mask_is_bilinear_so_edges_stay_soft():
    hard = np.zeros((8, 8), np.uint8)
    hard[:, 4:] = 255
    up = resize_mask(hard, (8, 32))
    assert ((up > 0) & (up < 255)).any()
    assert up[0, 0] == 0 and up[0, -1] == 255


def test_random_crop_flip_keeps_image_and_mask_aligned():
    img = rgb_array(40, 48)
    flips = 0
    for seed in range(20):
        out_img, out_mask = random_crop_flip(img, img[..., 0].copy(), 32, np.random.default_rng(seed))
        assert out_img.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        np.testing.assert_array_equal(out_mask, out_img[..., 0])
        assert out_img.flags.c_contiguous and out_mask.flags.c_contiguous
        unflipped = _find_window(img, out_img)
        flips += not unflipped
        assert unflipped or _find_window(img, out_img[:, ::-1])
    assert 0 < flips < 20


def _find_window(img: np.ndarray, window: np.ndarray) -> bool:
    h, w = window.shape[:2]
    return any(
        np.array_equal(img[t : t + h, l : l + w], window)
        for t in range(img.shape[0] - h + 1)
        for l in range(img.shape[1] - w + 1)
    )


def test_random_crop_larger_than_image_raises():
    with pytest.raises(ValueError, match="larger than image"):
        random_crop_flip(rgb_array(24, 40), np.zeros((24, 40), np.uint8), 32, np.random.default_rng(0))


def test_to_model_input_normalises_with_imagenet_stats():
    batch = np.zeros((2, 4, 6, 3), np.uint8)
    batch[1] = 255
    x = to_model_input(batch)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 6)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(x[1, :, 2, 3], (1 - mean) / std)


def test_to_model_input_accepts_tensors_and_read_only_arrays():
    batch = rgb_array(4, 6)[None]
    read_only = batch.copy()
    read_only.flags.writeable = False
    torch.testing.assert_close(to_model_input(torch.from_numpy(batch)), to_model_input(read_only))
    assert to_model_input(read_only)[0, 1, 2, 3] == pytest.approx(
        (batch[0, 2, 3, 1] / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1], abs=1e-6)


def test_to_model_input_rejects_float_and_nchw():
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        to_model_input(np.zeros((1, 3, 4, 4), np.uint8))


def test_mask_to_target_scales_to_unit_range():
    masks = np.array([[[0, 51, 255]]], np.uint8)
    target = mask_to_target(masks)
    assert target.shape == (1, 1, 1, 3) and target.dtype == torch.float32
    torch.testing.assert_close(target[0, 0, 0], torch.tensor([0.0, 0.2, 1.0]))


@pytest.mark.parametrize("channels", [None, 3, 4])
def test_encode_png_round_trips(channels):
    rng = np.random.default_rng(1)
    shape = (8, 12) if channels is None else (8, 12, channels)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(array)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), array)
    assert encode_png(array) == data
