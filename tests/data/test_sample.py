"""The synthetic DUTS-layout sample: layout, determinism, soft masks, reuse (no Ray)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from basnet.data import sample
from basnet.data.discovery import discover
from basnet.data.sample import default_sample_dir, ensure_sample, generate_sample
from basnet.errors import DataError

SMALL = {"n_train": 6, "n_test": 3, "size": (40, 48)}


def files(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_sample_writes_duts_layout(tmp_path):
    generate_sample(str(tmp_path), **SMALL)
    names = files(tmp_path)
    assert len([n for n in names if n.startswith("DUTS-TR/DUTS-TR-Image/") and n.endswith(".jpg")]) == 6
    assert len([n for n in names if n.startswith("DUTS-TR/DUTS-TR-Mask/") and n.endswith(".png")]) == 6
    assert len([n for n in names if n.startswith("DUTS-TE/DUTS-TE-Image/") and n.endswith(".jpg")]) == 3
    assert len([n for n in names if n.startswith("DUTS-TE/DUTS-TE-Mask/") and n.endswith(".png")]) == 3


def test_generate_sample_is_byte_identical_for_same_arguments(tmp_path):
    first = files(generate_sample(str(tmp_path / "a"), **SMALL))
    assert first == files(generate_sample(str(tmp_path / "b"), **SMALL))
    assert first != files(generate_sample(str(tmp_path / "c"), **SMALL, seed=1))


def test_sample_images_are_jpeg_and_masks_soft_8bit_png_of_same_size_one_in_eight_empty(sample_root):
    sizes, soft_masks, empty = set(), 0, []
    for pair in discover(sample_root).train:
        with Image.open(pair.image) as image, Image.open(pair.mask) as mask:
            assert (image.format, image.mode) == ("JPEG", "RGB")
            assert (mask.format, mask.mode) == ("PNG", "L")
            assert image.size == mask.size
            values = np.asarray(mask)
        if values.max() == 0:  # a scene without an object
            empty.append(Path(pair.mask).stem)
            continue
        assert values.min() == 0 and values.max() == 255
        soft_masks += bool(((values > 0) & (values < 255)).any())
        sizes.add(image.size)
    assert empty == ["sample_tr_0007", "sample_tr_0015"]  # every 8th of the 16 training images
    assert soft_masks == 14  # every object's mask has anti-aliased edge values
    assert len(sizes) > 1  # sizes vary by a few pixels


def saturation(image: np.ndarray) -> np.ndarray:
    return image.max(axis=2).astype(int) - image.min(axis=2)


def test_contrast_zero_hides_the_object_and_one_keeps_it(tmp_path):
    def pair(contrast: float) -> tuple[np.ndarray, np.ndarray]:
        return sample.make_example(40, 48, np.random.default_rng(3), contrast=contrast)

    hidden, mask = pair(0.0)
    shown, same_mask = pair(1.0)
    assert np.array_equal(mask, same_mask) and mask.max() == 255
    inside, outside = mask > 200, mask < 50
    # at 0 the object takes the background's colours: no more saturated inside than out
    assert saturation(hidden)[inside].mean() < saturation(hidden)[outside].mean() + 10
    assert saturation(shown)[inside].mean() > saturation(shown)[outside].mean() + 40
    empty_image, empty_mask = sample.make_example(40, 48, np.random.default_rng(3), empty=True)
    assert empty_mask.max() == 0 and empty_image.shape == (40, 48, 3)


def test_sample_foreground_is_more_saturated_than_background(sample_root):
    # What makes the sample learnable in a few epochs: colour separates object from background.
    for pair in discover(sample_root).train + discover(sample_root).val:
        image = np.asarray(Image.open(pair.image), dtype=np.float32) / 255
        mask = np.asarray(Image.open(pair.mask))
        if mask.max() == 0:
            continue  # a scene without an object
        saturation = image.max(axis=2) - image.min(axis=2)
        assert saturation[mask > 200].mean() > saturation[mask < 50].mean() + 0.15


def test_generate_default_sample_is_fast(tmp_path):
    start = time.perf_counter()
    generate_sample(str(tmp_path))
    assert time.perf_counter() - start < 5.0
    assert len(files(tmp_path)) == 2 * (48 + 16) + 1


def test_default_sample_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BASNET_SAMPLE_DIR", str(tmp_path / "here"))
    assert default_sample_dir() == str(tmp_path / "here")
    monkeypatch.delenv("BASNET_SAMPLE_DIR")
    assert default_sample_dir().endswith(str(Path(".cache") / "basnet-ray" / "sample-v2"))


def test_ensure_sample_generates_once_then_reuses(monkeypatch, tmp_path):
    monkeypatch.setenv("BASNET_SAMPLE_DIR", str(tmp_path / "cache" / "sample"))
    root = ensure_sample(**SMALL)
    assert root == str(tmp_path / "cache" / "sample")
    before = files(root)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated an existing sample")

    monkeypatch.setattr(sample, "generate_sample", fail)
    assert ensure_sample(**SMALL) == root
    assert files(root) == before
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["sample"]  # no temporary left


def test_ensure_sample_concurrent_callers_get_one_complete_sample(tmp_path):
    root = str(tmp_path / "sample")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_sample(root, **SMALL))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [root] * 3
    assert files(root) == files(generate_sample(str(tmp_path / "reference"), **SMALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "sample"]


def test_ensure_sample_losing_the_rename_race_keeps_the_winner(monkeypatch, tmp_path):
    root = ensure_sample(str(tmp_path / "sample"), **SMALL)
    winner = files(root)
    checks = iter([False])  # the first check runs before the other process finished
    real_reuse = sample._reuse
    monkeypatch.setattr(sample, "_reuse", lambda r, p: next(checks, None) or real_reuse(r, p))
    assert ensure_sample(root, **SMALL) == root
    assert files(root) == winner
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_ensure_sample_refuses_other_parameters_or_foreign_folder(tmp_path):
    root = ensure_sample(str(tmp_path / "sample"), **SMALL)
    with pytest.raises(DataError, match="holds a sample made with"):
        ensure_sample(root, **{**SMALL, "seed": 3})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not a complete sample"):
        ensure_sample(str(tmp_path / "mine"), **SMALL)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


def test_sample_masks_decode_like_duts_masks(sample_root):
    from basnet.imaging import decode_image, decode_mask

    pair = discover(sample_root).val[0]
    image = decode_image(Path(pair.image).read_bytes())
    mask = decode_mask(Path(pair.mask).read_bytes())
    assert image.shape[:2] == mask.shape and mask.dtype == np.uint8
    assert Image.open(io.BytesIO(Path(pair.image).read_bytes())).info.get("exif") is None
