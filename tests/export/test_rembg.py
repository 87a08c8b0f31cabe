"""A client no one here wrote: rembg's own command line (from PyPI, in ``.venv-rembg``, made by
``make rembg``) masks the sample's held-out images with this project's ONNX export, and its masks
are compared with the bulk job's at rembg's input side (320 px).

The comparison (``bench/rembg_compare.py``) replays rembg's steps on the export and swaps them for
this project's one at a time; the test holds that the replay is exactly what rembg did and that the
fully swapped replay is the bulk job, so every grey level between the two is put down to one of
three named steps (normalisation, resize in, resize out)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
REMBG = REPO / ".venv-rembg" / "bin" / "rembg"

pytestmark = pytest.mark.ray


def _compare_module():
    spec = importlib.util.spec_from_file_location("rembg_compare", REPO / "bench" / "rembg_compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_rembg_masks_with_the_export_as_is_and_every_grey_level_from_ours_is_accounted_for(
        exported, weights, sample_root, ray_session, tmp_path):
    if not REMBG.exists():
        pytest.fail(f"{REMBG} is missing: `make rembg` installs rembg in an environment of its own")
    compare = _compare_module()
    model_path, _ = exported
    home = str(Path(model_path).parent)  # rembg takes a custom model only from under its home
    # Two of the held-out images, one whose brightest value is below 255 (where rembg's normalisation
    # step changes the mask) and one at 255: each costs up to three passes at 320 px.
    images = str(tmp_path / "images")
    os.makedirs(images)
    held_out = sorted(Path(sample_root, "DUTS-TE", "DUTS-TE-Image").iterdir())
    for path in (held_out[0], held_out[2]):
        shutil.copy(path, images)
    files = sorted(Path(images).iterdir())

    proc = compare.run_rembg(str(REMBG), model_path, images, str(tmp_path / "rembg"), home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(home)) == ["basnet.onnx"]  # nothing downloaded (every proxy was a dead port)
    for path in files:
        with Image.open(path) as image, Image.open(tmp_path / "rembg" / f"{path.stem}.png") as mask:
            assert (mask.mode, mask.size) == ("L", image.size), path.name

    summary = compare.our_masks(weights, images, str(tmp_path / "job"))
    assert summary.written == len(files)
    rows = compare.account(model_path, images, str(tmp_path / "rembg"), str(tmp_path / "job"))
    compare.print_table(rows)  # the figures, with -s

    assert [r.name for r in rows] == [p.name for p in files]
    assert max(r.replay for r in rows) <= 1, rows  # rembg ran the export as it is: its masks are the replay's
    assert max(r.job for r in rows) <= 1, rows  # and the replay with our three steps is the bulk job
    # The normalisation step is rembg dividing by the brightest value of its resized image (the
    # replay takes that value from the image, so at 255 the step is nothing by construction): below
    # 255 it changes the mask.
    dimmer = [r for r in rows if r.brightest < 255]
    assert dimmer and all(r.normalise > 0 for r in dimmer), rows
