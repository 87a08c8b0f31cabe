"""Discovery and pairing of DUTS-layout datasets on local disk (no Ray)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from basnet.data.discovery import Pair, discover, evaluation_pairs, find_split_dirs, hold_out, pair_files
from basnet.errors import DataError


def touch(root: Path, *names: str) -> None:
    """Create placeholder files: pairing looks at names only, never at pixels."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def generic_root(tmp_path: Path, n: int) -> Path:
    touch(tmp_path, *(f"images/im{i:02d}.jpg" for i in range(n)), *(f"masks/im{i:02d}.png" for i in range(n)))
    return tmp_path


def test_discover_sample_counts_and_uses_duts_te_for_validation(sample_root):
    split = discover(sample_root)
    assert (len(split.train), len(split.val)) == (16, 8)
    assert split.val_source == "DUTS-TE" and split.skipped == []
    assert all("DUTS-TR-Image" in p.image and "DUTS-TR-Mask" in p.mask for p in split.train)
    assert all("DUTS-TE-Image" in p.image for p in split.val)
    assert [p.image for p in split.train] == sorted(p.image for p in split.train)


def test_discover_pairs_image_with_mask_of_same_stem(sample_root):
    for pair in discover(sample_root).train:
        assert pair.image.endswith(".jpg") and pair.mask.endswith(".png")
        assert Path(pair.image).stem == Path(pair.mask).stem


def test_find_split_dirs_accepts_duts_folder_as_root(sample_root):
    root = str(Path(sample_root) / "DUTS-TR")
    image_dir, mask_dir = find_split_dirs(root, "train")
    assert image_dir.endswith("DUTS-TR-Image") and mask_dir.endswith("DUTS-TR-Mask")
    assert find_split_dirs(root, "test") is None
    assert find_split_dirs(str(Path(sample_root) / "DUTS-TE"), "test") is not None


def test_find_split_dirs_generic_layout_and_absent(tmp_path):
    assert find_split_dirs(str(tmp_path), "train") is None
    generic_root(tmp_path, 2)
    assert find_split_dirs(str(tmp_path), "train") == (str(tmp_path / "images"), str(tmp_path / "masks"))
    assert find_split_dirs(str(tmp_path), "test") is None


def test_pair_files_handles_nested_folders_and_case(tmp_path):
    touch(tmp_path, "images/a/x.jpg", "images/b/x.JPEG", "masks/a/x.png", "masks/b/x.png",
          "images/notes.txt", "images/._x.jpg")
    pairs, unpaired = pair_files(str(tmp_path / "images"), str(tmp_path / "masks"))
    assert unpaired == []
    assert pairs == [
        Pair(str(tmp_path / "images/a/x.jpg"), str(tmp_path / "masks/a/x.png")),
        Pair(str(tmp_path / "images/b/x.JPEG"), str(tmp_path / "masks/b/x.png")),
    ]


def test_pair_files_unpaired_error_names_counts_and_fix(tmp_path):
    touch(tmp_path, "images/a.jpg", "images/b.jpg", "images/c.jpg", "masks/a.png", "masks/z.png")
    with pytest.raises(DataError) as info:
        pair_files(str(tmp_path / "images"), str(tmp_path / "masks"))
    message = str(info.value)
    assert "2 images have no mask and 1 masks have no image" in message
    assert f"under {tmp_path}" in message and "first: " + str(tmp_path / "images/b.jpg") in message
    assert message.endswith("fix the data or pass --skip-unpaired") and "\n" not in message


def test_pair_files_skip_unpaired_warns_and_returns_them(tmp_path, caplog):
    touch(tmp_path, "images/a.jpg", "images/b.jpg", "masks/a.png", "masks/z.png")
    with caplog.at_level(logging.WARNING, logger="basnet.data"):
        pairs, unpaired = pair_files(str(tmp_path / "images"), str(tmp_path / "masks"), skip_unpaired=True)
    assert pairs == [Pair(str(tmp_path / "images/a.jpg"), str(tmp_path / "masks/a.png"))]
    assert unpaired == [str(tmp_path / "images/b.jpg"), str(tmp_path / "masks/z.png")]
    assert "1 images have no mask and 1 masks have no image" in caplog.text


def test_pair_files_refuses_two_images_with_one_name(tmp_path):
    touch(tmp_path, "images/a.jpg", "images/a.png", "masks/a.png")
    with pytest.raises(DataError, match="have the same name"):
        pair_files(str(tmp_path / "images"), str(tmp_path / "masks"))


def test_discover_without_duts_te_holds_out_deterministic_disjoint_split(tmp_path):
    root = str(generic_root(tmp_path, 20))
    first, again = discover(root), discover(root)
    assert first == again
    assert first.val_source == "held-out 10%" and len(first.val) == 2 and len(first.train) == 18
    assert not {p.image for p in first.train} & {p.image for p in first.val}
    assert discover(root, seed=1).val != first.val


def test_hold_out_keeps_at_least_one_and_allows_none():
    pairs = [Pair(f"i{i}.jpg", f"m{i}.png") for i in range(3)]
    train, val = hold_out(pairs, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2
    assert hold_out(pairs, 0.0, seed=0) == (pairs, [])
    with pytest.raises(DataError, match="too few"):
        hold_out(pairs[:1], 0.1, seed=0)


def test_discover_missing_root_says_so(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass --data"):
        discover(str(tmp_path / "nowhere"))


def test_discover_empty_root_names_expected_folders(tmp_path):
    with pytest.raises(DataError, match="no DUTS-TR/DUTS-TR-Image and DUTS-TR-Mask folders"):
        discover(str(tmp_path))


def test_discover_empty_image_folder_says_no_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no images"):
        discover(str(tmp_path))


def test_evaluation_pairs_prefers_duts_te(sample_root):
    pairs = evaluation_pairs(sample_root)
    assert len(pairs) == 8 and all("DUTS-TE-Image" in p.image for p in pairs)


def test_evaluation_pairs_generic_layout_scores_everything(tmp_path):
    assert len(evaluation_pairs(str(generic_root(tmp_path, 5)))) == 5


def test_evaluation_pairs_falls_back_to_the_held_out_split(sample_root):
    train_only = str(Path(sample_root) / "DUTS-TR")
    assert evaluation_pairs(train_only) == discover(train_only).val
    assert len(evaluation_pairs(train_only)) == 2
