"""ONNX export: ONNX Runtime against PyTorch at two sizes and two batch sizes, fp16, all outputs,
the job's arguments; and ONNX Runtime's masks through this project's rendering."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from basnet import storage
from basnet.checkpoint import CheckpointError, load_model
from basnet.device import to_model_input
from basnet.export.config import FP16_TOLERANCE, FP32_TOLERANCE
from basnet.errors import UsageError
from basnet.export.onnx_model import SIZE_KEY, check_onnx, export_onnx, ort_session
from basnet.infer.predictor import load_weights
from basnet.predict import predict_probabilities
from basnet.imaging import decode_image, render_output
from basnet.transforms import resize_image

from conftest import load_job

SIZE = 64


def test_export_and_onnx_runtime_agree_to_1e4_at_batch_1_and_3_at_64_and_96_px(exported, weights):
    path, printed = exported
    rows = check_onnx(load_model(weights), path, sizes=[64, 96], batches=(1, 3))
    assert [(r.batch, r.size) for r in rows] == [(1, 64), (3, 64), (1, 96), (3, 96)]
    assert max(r.max_diff for r in rows) <= FP32_TOLERANCE, rows
    assert "check passed" in printed and printed.count("largest |ONNX Runtime - PyTorch|") == 4
    graph = onnx.load(path, load_external_data=False).graph
    (image,) = graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims  # dynamic N, H, W
    assert [o.name for o in graph.output] == ["saliency"]
    # a shape it was neither traced nor checked at: 2 x 3 x 32 x 128
    out = ort_session(path).run(None, {"image": np.zeros((2, 3, 32, 128), np.float32)})[0]
    assert out.shape == (2, 1, 32, 128) and 0.0 <= out.min() and out.max() <= 1.0


def test_onnx_runtime_masks_match_this_projects_masks_within_one_grey_level(exported, weights, sample_root):
    path, _ = exported
    model = load_model(weights)
    session = ort_session(path)
    folder = Path(sample_root) / "DUTS-TE" / "DUTS-TE-Image"
    for image_path in sorted(folder.iterdir()):
        data = image_path.read_bytes()
        image = decode_image(data)
        resized = resize_image(image, SIZE)[None]
        ours = predict_probabilities(model, torch.from_numpy(resized), device=torch.device("cpu"))[0].numpy()
        prob = session.run(None, {"image": to_model_input(resized).numpy()})[0][0, 0]
        prob = (prob - prob.min()) / max(prob.max() - prob.min(), 1e-8)  # the min-max every consumer applies
        height, width = image.shape[:2]
        a = np.asarray(render_output(ours, height, width, fmt="mask"))
        b = np.asarray(render_output(prob, height, width, fmt="mask"))
        diff = np.abs(np.asarray(Image.open(io.BytesIO(a)), int) - np.asarray(Image.open(io.BytesIO(b)), int))
        assert diff.max() <= 1, (image_path.name, diff.max())


def test_an_export_names_its_size_and_the_bulk_job_loads_it_as_is_or_refuses_it_in_one_line(exported, tmp_path):
    path, _ = exported  # exported with --image-size 64
    assert {p.key: p.value for p in onnx.load(path).metadata_props}[SIZE_KEY] == "64"
    for size, expected in ((None, 64), (32, 32)):  # checked, then read by each replica as it is
        assert load_weights(path, size, "onnxruntime") == (path, expected)
    bare = onnx.load(path)
    del bare.metadata_props[:]  # an ONNX model from elsewhere: its size must be given
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(UsageError, match="no basnet.image_size metadata.*pass --image-size"):
        load_weights(str(tmp_path / "bare.onnx"), None, "onnxruntime")
    assert load_weights(str(tmp_path / "bare.onnx"), 96, "onnxruntime")[1] == 96
    (tmp_path / "torch.onnx").write_bytes(b"PK\x03\x04 a torch zip file named .onnx")
    with pytest.raises(CheckpointError, match="torch.onnx is not an ONNX model") as info:
        load_weights(str(tmp_path / "torch.onnx"), 64, "onnxruntime")
    assert "\n" not in str(info.value)
    flat = onnx.helper.make_model(onnx.helper.make_graph(  # ONNX, but not an image model
        [onnx.helper.make_node("Sigmoid", ["image"], ["saliency"])], "flat",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 8])],
        [onnx.helper.make_tensor_value_info("saliency", onnx.TensorProto.FLOAT, ["n", 8])]))
    onnx.save(flat, tmp_path / "flat.onnx")
    with pytest.raises(CheckpointError, match=r"flat.onnx is not an ONNX model of one \(N, 3, H, W\) image input"):
        load_weights(str(tmp_path / "flat.onnx"), 64, "onnxruntime")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(str(tmp_path / "folder.onnx"), 64, "onnxruntime")  # gone since the plan checked it


def test_the_size_check_reads_an_exports_small_fields_only_and_refuses_a_truncated_or_split_file(exported, tmp_path,
                                                                                                monkeypatch):
    from basnet.export.onnx_model import onnx_image_size

    path, _ = exported

    class Counted(io.FileIO):
        read_bytes = 0

        def read(self, n=-1):
            data = super().read(n)
            Counted.read_bytes += len(data)
            return data

    with Counted(path) as f:
        assert onnx_image_size(f, path) == 64
    assert Counted.read_bytes < 64 * 1024 < os.path.getsize(path) // 100, Counted.read_bytes
    with monkeypatch.context() as patch:  # the bulk job's check of a local file walks it too
        patch.setattr(storage, "read_bytes", lambda uri: pytest.fail(f"{uri} was read whole"))
        assert load_weights(path, None, "onnxruntime") == (path, 64)
    data = Path(path).read_bytes()
    (tmp_path / "half.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.onnx is not an ONNX model .*runs past the end"):
        load_weights(str(tmp_path / "half.onnx"), None, "onnxruntime")
    split = onnx.load(path)
    onnx.save(split, tmp_path / "split.onnx", save_as_external_data=True, location="split.weights")
    with pytest.raises(CheckpointError, match="split.onnx keeps its weights in external data files"):
        load_weights(str(tmp_path / "split.onnx"), None, "onnxruntime")


def test_fp16_export_agrees_to_1e2_and_all_outputs_gives_eight_maps(weights, tmp_path):
    # One export shows both (each costs about 15 s here): half precision, and all eight maps, each
    # checked against the fp32 model's (the fp32 test holds the refined map to 1e-4).
    model = load_model(weights)
    fp16 = str(tmp_path / "fp16.onnx")
    export_onnx(model, fp16, image_size=SIZE, fp16=True, all_outputs=True)  # a half copy: model stays fp32
    rows = check_onnx(model, fp16, sizes=[64], batches=(2,), all_outputs=True)  # the fp32 test: dynamic shapes
    assert rows[0].outputs == 8
    assert max(r.max_diff for r in rows) <= FP16_TOLERANCE, rows
    assert max(r.max_diff for r in rows) > 1e-6  # it really computes in half precision
    assert Path(fp16).stat().st_size < 0.6 * 4 * sum(p.numel() for p in model.parameters())


def test_bad_arguments_exit_2_with_one_line(weights, tmp_path, capsys):
    job = load_job("export")
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"x")
    cases = {
        "--out is required": ["--weights", weights],
        "checkpoint not found": ["--weights", str(tmp_path / "no.pth"), "--out", str(tmp_path / "a.onnx")],
        "should end in .onnx": ["--weights", weights, "--out", str(tmp_path / "a.pt")],
        "exists: pass --overwrite": ["--weights", weights, "--out", str(taken)],
        "--check-sizes must be multiples of 32": ["--weights", weights, "--out", str(tmp_path / "b.onnx"),
                                                  "--check-sizes", "64,100"],
        "--opset must be 17 or more": ["--weights", weights, "--out", str(tmp_path / "c.onnx"), "--opset", "11"],
    }
    for words, argv in cases.items():
        assert job.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    assert taken.read_bytes() == b"x"  # never overwritten without --overwrite


def test_the_session_a_replica_holds_gives_the_fully_optimised_sessions_outputs_bit_for_bit(exported, monkeypatch,
                                                                                         caplog, tmp_path):
    """ort_session optimises the graph in a child process, keeps the result in the machine's cache
    and loads it as it is: the same outputs as ONNX Runtime's full optimisation made in this
    process, and its NumPy input is to_model_input's. A second session of the same graph loads the
    kept one without a child. Without a cache, if the child fails, the session is optimised here,
    with a warning."""
    import onnxruntime as ort

    from basnet.export import ort as ort_module

    path, _ = exported
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    x = ort_module.model_input(images)
    assert np.array_equal(x, to_model_input(images).numpy())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    expected = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    monkeypatch.setenv(ort_module.CACHE_ENV, str(tmp_path / "cache"))
    assert np.array_equal(ort_session(path).run(None, {"image": x})[0], expected)
    (kept,) = (tmp_path / "cache").glob("*.onnx")
    monkeypatch.setattr(ort_module, "_OPTIMISE", "raise SystemExit('no optimiser here')")
    with caplog.at_level("WARNING", logger=ort_module.__name__):
        # The same graph again, as the bytes an S3 read gives: the kept graph, no child (it would fail).
        again = ort_session(np.fromfile(path, np.uint8))
        assert caplog.text == ""
        assert np.array_equal(again.run(None, {"image": x})[0], expected)
        monkeypatch.setenv(ort_module.CACHE_ENV, "off")
        fallback = ort_session(np.fromfile(path, np.uint8))
    assert "no optimiser here" in caplog.text
    assert np.array_equal(fallback.run(None, {"image": x})[0], expected)
    assert [p.name for p in (tmp_path / "cache").glob("*.onnx")] == [kept.name]


def _tiny_conv_model(path: Path, seed: int) -> str:
    """A one-convolution image model, different for each seed."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((1, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["saliency"], pads=[1, 1, 1, 1])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("saliency", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_the_machines_optimised_graphs_are_made_once_while_others_wait_and_the_two_last_used_are_kept(
        tmp_path, monkeypatch, caplog):
    import fcntl
    import threading

    from basnet.export import ort as ort_module

    cache = tmp_path / "cache"
    monkeypatch.setenv(ort_module.CACHE_ENV, str(cache))
    models = [_tiny_conv_model(tmp_path / f"m{i}.onnx", seed=i) for i in range(3)]
    x = np.random.default_rng(9).standard_normal((1, 3, 8, 8)).astype(np.float32)
    first = ort_session(models[0]).run(None, {"image": x})[0]
    (kept,) = cache.glob("*.onnx")

    # Another replica of the node holds the lock, optimising the same graph: this one waits for it
    # and loads its file, without a child of its own (which would fail here).
    kept_bytes = kept.read_bytes()
    kept.unlink()
    monkeypatch.setattr(ort_module, "_OPTIMISE", "raise SystemExit('no optimiser here')")
    caplog.set_level("WARNING", logger=ort_module.__name__)
    done = {}
    with open(kept.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: done.setdefault("session", ort_session(models[0])))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not done  # still waiting for the lock
        kept.write_bytes(kept_bytes)  # the other replica's optimised graph, in place
    waiter.join(timeout=60)
    assert np.array_equal(done["session"].run(None, {"image": x})[0], first)
    assert "no optimiser here" not in caplog.text  # it never ran a child (nor fell back without one)

    monkeypatch.undo()
    monkeypatch.setenv(ort_module.CACHE_ENV, str(cache))
    stale = cache / "0123.onnx.999.partial"
    stale.write_bytes(b"a crashed optimiser's")
    os.utime(stale, (0, 0))
    for model in models[1:]:
        ort_session(model)
    names = sorted(p.name for p in cache.iterdir())
    assert kept.name not in names and len([n for n in names if n.endswith(".onnx")]) == 2, names
    assert len([n for n in names if n.endswith(".lock")]) == 2 and stale.name not in names, names
