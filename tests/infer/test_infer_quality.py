"""Which masks are wrong: the bulk job's quality figures, review sheet and no-object masks, on the
session's local Ray.

The model is a real ONNX file that the job runs with ONNX Runtime, written here so that its answers
are known: saliency = sigmoid(4 (red - 0.4)) of the normalised red channel, pixel by pixel. A red
disc is a decided object; a dull red one a faint, undecided one; a dark, noisy picture a scene
without an object. (BASNet with random weights calls every picture an object; a trained one
cannot be trained in a test.)"""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from basnet.export.onnx_model import SIZE_KEY
from basnet.infer.config import InferConfig
from basnet.infer.manifest import read_run_manifest
from basnet.infer.ray_pipeline import run_inference
from basnet.infer.review import LISTING, REVIEW_DIR, SHEET, TILE

pytestmark = pytest.mark.ray

SIDE = 48


def red_channel_model(path: str) -> str:
    """A (N, 3, H, W) -> (N, 1, H, W) ONNX model: sigmoid(4 * (x[:, 0:1] - 0.4))."""
    nodes = [helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["red"]),
             helper.make_node("Sub", ["red", "offset"], ["centred"]),
             helper.make_node("Mul", ["centred", "gain"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["saliency"])]
    constants = [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("ends", TensorProto.INT64, [1], [1]),
                 helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                 helper.make_tensor("offset", TensorProto.FLOAT, [], [0.4]),
                 helper.make_tensor("gain", TensorProto.FLOAT, [], [4.0])]
    graph = helper.make_graph(
        nodes, "red", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("saliency", TensorProto.FLOAT, ["n", 1, "h", "w"])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {SIZE_KEY: "32"})
    onnx.save(model, path)
    return path


def picture(red: int | None, seed: int) -> np.ndarray:
    """Dark noise, with a disc of the given red in the middle (None: no disc)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 60, size=(SIDE, SIDE, 3)).astype(np.uint8)
    if red is not None:
        yy, xx = np.mgrid[:SIDE, :SIDE]
        image[(yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 < (SIDE / 4) ** 2] = (red, 30, 30)
    return image


# name -> the disc's red (None: a scene without an object)
PICTURES = {"object_a": 255, "object_b": 230, "object_c": 210, "faint": 140, "empty_a": None, "empty_b": None}
NO_OBJECT = {"faint", "empty_a", "empty_b"}


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    inputs = root / "in"
    inputs.mkdir()
    for i, (name, red) in enumerate(PICTURES.items()):
        Image.fromarray(picture(red, i)).save(inputs / f"{name}.png")
    weights = red_channel_model(str(root / "red.onnx"))
    keep = run_inference(InferConfig(input=str(inputs), output=str(root / "keep"), weights=weights, review=4,
                                     flag_below=0.5))
    empty = run_inference(InferConfig(input=str(inputs), output=str(root / "empty"), weights=weights,
                                      on_no_object="empty"))
    return keep, empty


def rows_by_name(summary) -> dict[str, dict]:
    return {row["input"].rsplit("/", 1)[-1].split(".")[0]: row for row in read_run_manifest(summary).to_pylist()}


def grey(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_the_manifest_gives_each_mask_its_confidence_and_flags_the_scenes_without_an_object(runs):
    keep, empty = runs
    rows, emptied = rows_by_name(keep), rows_by_name(empty)
    assert {name for name, row in rows.items() if row["no_object"]} == NO_OBJECT
    confidence = {name: row["confidence"] for name, row in rows.items()}
    # decided objects far above the masks min-max made of what the model did not call an object
    assert min(confidence[n] for n in ("object_a", "object_b", "object_c")) > 0.8
    assert max(confidence[n] for n in NO_OBJECT) < 0.5
    assert confidence["object_a"] > confidence["object_b"] > confidence["object_c"]  # less red, less sure
    # written empty (--on-no-object empty), a scene without an object is a mask the model is sure of;
    # the faint disc it hesitated over is not
    assert min(emptied[n]["confidence"] for n in ("empty_a", "empty_b")) > 0.8 > emptied["faint"]["confidence"]
    for name in ("object_a", "object_b", "object_c"):
        assert emptied[name]["confidence"] == rows[name]["confidence"]  # the same mask, the same figures
    for row in rows.values():
        assert 0 < row["confidence"] <= 1 and (row["peak"] < 0.5) == row["no_object"]
        assert 0 <= row["expected_error"] <= 1 and 0 <= row["salient_share"] <= 1
    assert rows["object_a"]["salient_share"] == pytest.approx(np.pi / 16, abs=0.02)  # the disc's area
    assert keep.quality == "quality: 3 of 6 masks show no object; 3 under confidence 0.5 (--flag-below)"


def test_review_4_writes_a_sheet_and_a_list_of_the_4_least_confident_least_first(runs):
    keep, _ = runs
    rows = rows_by_name(keep)
    expected = sorted(rows, key=lambda name: rows[name]["confidence"])[:4]
    assert set(keep.review) == {SHEET, LISTING}
    assert keep.review[SHEET] == f"{keep.output}/{REVIEW_DIR}/{SHEET}"
    with open(keep.review[LISTING]) as f:
        listed = list(csv.DictReader(f))
    assert [row["input"].rsplit("/", 1)[-1].split(".")[0] for row in listed] == expected
    assert [float(row["confidence"]) for row in listed] == pytest.approx(
        [rows[name]["confidence"] for name in expected], abs=1e-4)
    assert [row["no_object"] == "True" for row in listed] == [rows[name]["no_object"] for name in expected]
    sheet = Image.open(keep.review[SHEET])
    assert sheet.width == 3 * TILE + 4 * 4 and sheet.height == 20 + 4 * (TILE + 16 + 4)  # 3 columns, 4 rows
    cells = np.asarray(sheet.convert("RGB"))
    top = 20  # the first row: the least confident: image, mask, cut-out all drawn
    for column in range(3):
        left = 4 + column * (TILE + 4)
        cell = cells[top:top + TILE, left:left + TILE]
        assert cell.std() > 5, f"column {column} of the first row is blank"


def test_on_no_object_empty_writes_empty_masks_for_the_flagged_images_only(runs):
    keep, empty = runs
    kept, emptied = rows_by_name(keep), rows_by_name(empty)
    for name in PICTURES:
        before, after = grey(kept[name]["output"]), grey(emptied[name]["output"])
        assert after.shape == before.shape == (SIDE, SIDE)
        if name in NO_OBJECT:
            assert before.max() > 200 and not after.any(), name  # min-max had stretched noise to a full mask
        else:
            assert np.array_equal(after, before), name
    assert empty.review == {}  # no --review, no sheet


# What a replica on --runtime onnxruntime runs (the actor's module, the predictor, the write stage
# it renders with), in a fresh interpreter: torch is 0.47 GB resident in each process that imports it.
REPLICA = """
import sys
import numpy as np
from basnet.infer import ray_pipeline  # the module of the replicas' actor class
from basnet.infer.predictor import MaskPredictor
from basnet.infer.stages import decode_batch, write_batch
items = {"kind": ["image"], "source": [sys.argv[2]], "output": [sys.argv[3]]}
batch = {k: np.array(v, dtype=object) for k, v in items.items()}
batch.update(input=batch["source"], status=np.array(["pending"], dtype=object),
             error=np.array([""], dtype=object), list_s=np.zeros(1))
decoded, = decode_batch(batch, size=32, max_pixels=10**8, keep_bytes=True, overwrite=False,
                        batch_size=1)
predictor = MaskPredictor(sys.argv[1], runtime="onnxruntime", image_size=32, threads=1)
out = write_batch(predictor(decoded), fmt="rgba", threshold=0.5, size=32, refine="guided")
print(list(out["status"]), sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""


def test_a_replica_on_onnxruntime_masks_and_writes_without_importing_torch(tmp_path):
    Image.fromarray(picture(255, 0)).save(tmp_path / "object.png")
    weights = red_channel_model(str(tmp_path / "red.onnx"))
    proc = subprocess.run([sys.executable, "-c", REPLICA, weights, str(tmp_path / "object.png"),
                           str(tmp_path / "out" / "object.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["['written']", "[]"], proc.stdout
    with Image.open(tmp_path / "out" / "object.png") as cutout:
        assert cutout.mode == "RGBA" and cutout.size == (SIDE, SIDE)
