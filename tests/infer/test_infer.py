"""The bulk-masking job end to end on the session's local Ray: real files, moto S3, a killed run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from PIL import Image

from basnet import storage
from basnet.checkpoint import load_model
from basnet.errors import CheckpointError
from basnet.infer.config import InferConfig
from basnet.infer.manifest import not_images_line, read_run_manifest
from basnet.infer.predictor import MaskPredictor, load_weights
from basnet.infer import ray_pipeline
from basnet.infer.ray_pipeline import run_inference
from basnet.predict import predict_probabilities
from basnet.imaging import decode_image
from basnet.imaging.refine import BAND
from basnet.transforms import resize_image, resize_mask

from infer_collection import EXPECTED_OUTPUTS, MAX_PIXELS, bad_files, encode, picture, write_collection, write_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 32

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("collection"))
    return root, write_collection(root)


def config(input_uri: str, output: str, weights: str, **extra) -> InferConfig:
    return InferConfig(input=input_uri, output=output, weights=weights, image_size=SIZE, batch_size=4,
                       max_pixels=MAX_PIXELS, **extra)


@pytest.fixture(scope="module")
def local_run(ray_session, collection, weights, tmp_path_factory):
    root, _ = collection
    out = str(tmp_path_factory.mktemp("local") / "masks")
    return out, run_inference(config(root, out, weights))


def pngs(root: str) -> dict[str, str]:
    """Relative path -> URI of every mask under an output root (the manifest folder left out)."""
    found = storage.list_files(root, [".png"])
    return {storage.relative_to(uri, root): uri for uri in found}


def grey(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))))


def test_every_valid_image_gets_a_mask_of_its_original_size_at_its_mirrored_path(collection, local_run):
    root, sizes = collection
    out, summary = local_run
    assert pngs(out).keys() == set(EXPECTED_OUTPUTS.values())
    for rel, size in sizes.items():
        mask = Image.open(os.path.join(out, EXPECTED_OUTPUTS[rel]))
        assert (mask.mode, (mask.height, mask.width)) == ("L", size), rel


def test_bad_inputs_are_failed_in_the_manifest_a_non_image_is_counted_and_counts_add_up(collection, local_run):
    root, sizes = collection
    out, summary = local_run
    assert (summary.written, summary.skipped, summary.failed) == (len(sizes), 0, len(bad_files()))
    assert not_images_line(summary.not_images) == "1 file is not an image (.txt 1)"  # notes.txt: named, not an input
    table = read_run_manifest(summary)
    assert table.num_rows == summary.total == len(sizes) + len(bad_files())
    rows = {os.path.relpath(r["input"], root): r for r in table.to_pylist()}
    for rel in bad_files():
        assert rows[rel]["status"] == "failed" and rows[rel]["error"], rel
    assert "max-pixels" in rows["bad/huge.png"]["error"]
    for rel, (height, width) in sizes.items():
        row = rows[rel]
        assert (row["status"], row["height"], row["width"], row["error"]) == ("written", height, width, None)
        assert row["output"] == os.path.join(out, EXPECTED_OUTPUTS[rel]) and row["seconds"] > 0


def test_resolved_config_is_saved_beside_the_masks(local_run, weights):
    out, summary = local_run
    assert summary.config.startswith(os.path.join(out, "_config", "config-"))
    saved = yaml.safe_load(storage.read_bytes(summary.config))
    assert saved["weights"] == weights and saved["image_size"] == SIZE
    # One node of 2 CPUs: one actor with all but the decode and write tasks' 2 x 0.25 CPU.
    assert (saved["actors"], saved["cpus_per_actor"], saved["num_gpus_per_actor"]) == (1, 1.5, 0)
    assert all(os.path.basename(p).startswith(f"part-{summary.run_id}-") for p in summary.manifest)
    assert set(pq.read_table(os.path.join(out, "_manifest")).column("run_id").to_pylist()) == {summary.run_id}


def test_pipeline_masks_equal_direct_model_calls_within_one_grey_level(collection, local_run, weights):
    root, sizes = collection
    out, _ = local_run
    model = load_model(weights)
    for rel, (height, width) in sizes.items():
        image = decode_image(storage.read_bytes(os.path.join(root, rel)))
        batch = torch.from_numpy(resize_image(image, SIZE)[None])
        prob = predict_probabilities(model, batch, device=torch.device("cpu"))[0].numpy()
        direct = np.clip(np.rint(resize_mask(prob, (height, width)) * 255), 0, 255)
        piped = grey(os.path.join(out, EXPECTED_OUTPUTS[rel])).astype(np.int16)
        assert np.abs(piped - direct).max() <= 1, rel


def test_a_run_with_no_cluster_to_join_masks_in_this_process_without_ray_as_the_ray_pipeline_does_within_one_grey_level(
        collection, local_run, weights, tmp_path):
    root, sizes = collection
    ray_out, ray_summary = local_run
    out = str(tmp_path / "masks")
    args = ["--input", root, "--output", out, "--weights", weights, "--image-size", str(SIZE), "--batch-size", "4",
            "--max-pixels", str(MAX_PIXELS)]
    no_ray = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = ['jobs/infer.py', *sys.argv[1:]]; "
              "runpy.run_path('jobs/infer.py', run_name='__main__')")  # any import of Ray fails
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", no_ray, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "in this process (no Ray)" in proc.stderr
    saved = yaml.safe_load(storage.read_bytes(storage.list_files(os.path.join(out, "_config"), [".yaml"])[0]))
    assert (saved["executor"], saved["actors"], saved["image_size"]) == ("local", None, SIZE)  # --config: the same
    assert f"written {len(sizes)}, skipped 0, failed {len(bad_files())}" in proc.stdout
    assert "1 file is not an image (.txt 1)" in proc.stdout
    assert pngs(out).keys() == pngs(ray_out).keys()
    for rel, uri in pngs(out).items():  # within one grey level: torch's sums differ with the batch's make-up
        assert np.abs(grey(uri).astype(np.int16) - grey(pngs(ray_out)[rel])).max() <= 1, rel
    mine = pq.read_table(os.path.join(out, "_manifest")).to_pylist()
    theirs = read_run_manifest(ray_summary).to_pylist()
    assert sorted((os.path.relpath(r["input"], root), r["status"], r["error"], r["width"], r["height"])
                  for r in mine) == sorted((os.path.relpath(r["input"], root), r["status"], r["error"], r["width"],
                                            r["height"]) for r in theirs)


def test_a_checkpoint_exported_for_onnxruntime_masks_as_the_torch_run_within_one_grey_level(collection, local_run,
                                                                                            weights):
    """--runtime onnxruntime with a checkpoint: the weight-loading task exports it (an ONNX graph as
    a uint8 array, what the replicas are given) and a replica's predictor masks as the torch job did.
    The job around it (the replicas, the saved runtime) is the exported file's test below: a Ray run
    here would add nothing but its start-up to the export's 17 s."""
    root, sizes = collection
    out, _ = local_run
    graph, side = load_weights(weights, SIZE, "onnxruntime")
    assert side == SIZE and graph.dtype == np.uint8
    assert onnx.load_from_string(graph.tobytes()).graph.input[0].name == "image"
    predictor = MaskPredictor(graph, runtime="onnxruntime", image_size=SIZE, threads=2)
    worst = 0
    for rel, (height, width) in sizes.items():
        image = decode_image(storage.read_bytes(os.path.join(root, rel)))
        prob = predictor.predict(resize_image(image, SIZE)[None])[0]
        ours = np.clip(np.rint(resize_mask(prob, (height, width)) * 255), 0, 255)
        worst = max(worst, int(np.abs(grey(os.path.join(out, EXPECTED_OUTPUTS[rel])).astype(np.int16) - ours).max()))
    assert worst <= 1, worst


def test_an_exported_onnx_file_as_weights_runs_on_onnxruntime_as_is_and_matches_the_torch_run(
        collection, local_run, exported, tmp_path):
    root, _ = collection
    out, local = local_run
    path, _ = exported  # jobs/export.py on the same random weights (its metadata's 64 px: overridden by 32 here)
    summary = run_inference(config(root, str(tmp_path / "onnx"), path))  # no --runtime: the .onnx picks it
    assert (summary.written, summary.failed) == (local.written, local.failed)
    (graph_ref, _), = ray_pipeline._loaded.values()
    # The replicas read the file itself: nothing exported again, nothing held in the object store.
    assert ray.get(graph_ref) == path
    saved = yaml.safe_load(storage.read_bytes(summary.config))
    assert (saved["runtime"], saved["image_size"]) == ("onnxruntime", SIZE)
    here, there = pngs(out), pngs(str(tmp_path / "onnx"))
    assert here.keys() == there.keys()
    worst = max(np.abs(grey(here[rel]).astype(np.int16) - grey(there[rel])).max() for rel in here)
    assert worst <= 1, worst


def test_a_model_onnx_runtime_cannot_load_ends_the_run_with_its_replicas_one_line_error(ray_session, collection,
                                                                                         tmp_path):
    # The driver's check reads the graph's inputs, not its operators: this one passes it, and only
    # a replica's session finds it cannot run it. Ray hands the driver that only as an ActorDiedError.
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])
    saliency = helper.make_tensor_value_info("saliency", TensorProto.FLOAT, ["n", 1, "h", "w"])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["image"], ["saliency"], domain="com.example")],
                              "foreign", [image], [saliency])
    path = str(tmp_path / "foreign.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), path)
    with pytest.raises(CheckpointError) as info:
        run_inference(config(collection[0], str(tmp_path / "out"), path))
    message = str(info.value)
    assert message.startswith(f"ONNX Runtime cannot load {path}: ") and "NoSuchOp" in message, message
    assert "\n" not in message and message.endswith("pass a model written by jobs/export.py, or a training checkpoint")


def test_s3_in_and_out_gives_the_local_runs_masks_within_one_grey_level(collection, local_run, weights, s3_bucket):
    root, _ = collection
    out, local = local_run
    for path in storage.list_files(root):
        storage.write_bytes(f"{s3_bucket}/photos/{storage.relative_to(path, root)}", storage.read_bytes(path))
    summary = run_inference(config(f"{s3_bucket}/photos", f"{s3_bucket}/masks", weights))
    assert (summary.written, summary.failed) == (local.written, local.failed)
    remote, here = pngs(f"{s3_bucket}/masks"), pngs(out)
    assert remote.keys() == here.keys()
    # Not byte for byte: batches form as blocks arrive, and the model's floats differ in the last
    # bits between batch sizes (1e-6 here), which can move a rounding by one level.
    worst = max(np.abs(grey(remote[rel]).astype(np.int16) - grey(here[rel])).max() for rel in here)
    assert worst <= 1, worst
    assert read_run_manifest(summary).num_rows == summary.total


@pytest.mark.parametrize("fmt", ["binary", "rgba"])
def test_binary_and_rgba_formats_follow_the_soft_mask(fmt, collection, local_run, weights, tmp_path):
    root, sizes = collection
    soft_out, _ = local_run
    chosen = ["a/x.jpg", "exif.jpg", "a/deep/er/y.PNG"]
    out = str(tmp_path / fmt)
    summary = run_inference(config(None, out, weights, root=root, format=fmt),
                            images=[os.path.join(root, rel) for rel in chosen])
    assert summary.written == len(chosen)
    compared = 0
    for rel in chosen:
        result = grey(os.path.join(out, EXPECTED_OUTPUTS[rel]))
        soft = grey(os.path.join(soft_out, EXPECTED_OUTPUTS[rel]))
        if fmt == "binary":
            assert set(np.unique(result)) <= {0, 255} and result.shape == sizes[rel]
            assert np.mean((result == 255) == (soft >= 128)) > 0.98
        else:  # a cut-out's default is the guided path: the soft mask outside the transition band,
            # the photo's own colours where alpha is 0 or 255 (re-estimated between)
            image = decode_image(storage.read_bytes(os.path.join(root, rel)))
            alpha = result[..., 3]
            outside = (soft <= BAND[0] - 1) | (soft >= BAND[1] + 1)  # one grey level of slack
            assert result.shape == (*sizes[rel], 4)
            assert (np.abs(alpha[outside].astype(int) - soft[outside]) <= 1).all()
            whole = (alpha == 0) | (alpha == 255)
            assert np.array_equal(result[..., :3][whole], image[whole])
            compared += int(outside.sum()) + int(whole.sum())
    assert fmt == "binary" or compared > 0  # some pixels of the cut-outs were held to the plain path


def test_explicit_image_list_masks_only_those_images_mirrored_under_the_root(collection, weights, tmp_path):
    root, _ = collection
    out = str(tmp_path / "preds")
    images = [os.path.join(root, "b/x.jpg"), os.path.join(root, "a/deep/er/y.PNG")]
    summary = run_inference(config(None, out, weights, root=root), images=images)
    assert (summary.written, summary.total) == (2, 2)
    assert pngs(out).keys() == {"b/x.png", "a/deep/er/y.png"}


def test_tar_shard_input_masks_members_and_never_writes_outside_the_output(weights, tmp_path):
    (tmp_path / "shards").mkdir()
    write_shard(str(tmp_path / "shards" / "s0.tar"))
    out = str(tmp_path / "out" / "masks")
    summary = run_inference(config(str(tmp_path / "shards" / "s0.tar"), out, weights))
    assert pngs(out).keys() == {"s0/img/p.png", "s0/img/q.png", "s0/abs/y.png", "s0/odd_name?.png"}
    assert (summary.written, summary.failed, summary.total) == (4, 2, 6)
    failed = {r["input"].split("#", 1)[1]: r["error"] for r in read_run_manifest(summary).to_pylist()
              if r["status"] == "failed"}
    assert failed.keys() == {"../../x.jpg", "link.jpg"} and "unsafe" in failed["../../x.jpg"]
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(folder, name)
            assert path.startswith((out + os.sep, str(tmp_path / "shards") + os.sep)), path


@pytest.mark.parametrize("kind", ["text", "parquet"])
def test_manifest_input_masks_the_listed_images_relative_to_the_manifest(kind, collection, weights, tmp_path):
    root, _ = collection
    listed = ["a/x.jpg", os.path.join(str(tmp_path), "b/x.jpg"), "gray.jpg"]  # relative and absolute
    manifest = os.path.join(str(tmp_path), f"list.{'txt' if kind == 'text' else 'parquet'}")
    for rel in ("a/x.jpg", "b/x.jpg", "gray.jpg"):
        os.makedirs(os.path.dirname(os.path.join(tmp_path, rel)), exist_ok=True)
        os.link(os.path.join(root, rel), os.path.join(tmp_path, rel))
    if kind == "text":
        open(manifest, "w").write("# three images\n" + "\n".join(listed) + "\n")
    else:
        pq.write_table(pa.table({"path": listed, "note": ["p", "q", "r"]}), manifest)
    out = str(tmp_path / "masks")
    summary = run_inference(config(manifest, out, weights))
    assert (summary.written, summary.total) == (3, 3)
    assert pngs(out).keys() == {"a/x.png", "b/x.png", "gray.png"}


def write_many(root: str, n: int) -> None:
    for i in range(n):
        path = os.path.join(root, f"f{i % 3}", f"img{i:03d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode(Image.fromarray(picture(32, 32, i)), "JPEG"))


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job, its Ray (started in its own session) and every process below it."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, alive


def await_first_masks(proc: subprocess.Popen, out: str, timeout: float = 600) -> None:
    """Polls the output folder until the running job has written some masks."""
    deadline = time.monotonic() + timeout
    while not storage.list_files(out, [".png"]):
        assert proc.poll() is None, "the job ended before any mask appeared"
        assert time.monotonic() < deadline, "no mask appeared in time"
        time.sleep(0.02)  # polling the folder: a file appearing has no event to wait on


def test_killed_run_resumes_writing_only_the_missing_masks(ray_session, weights, tmp_path):
    n = 120
    write_many(str(tmp_path / "in"), n)
    out = str(tmp_path / "out")
    args = ["--input", str(tmp_path / "in"), "--output", out, "--weights", weights,
            "--image-size", str(SIZE), "--batch-size", "4", "--task-batch-size", "4", "--actors", "1"]
    with open(tmp_path / "job.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "jobs/infer.py", *args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            await_first_masks(proc, out)
        finally:
            kill_process_tree(proc)
    before = {rel: os.stat(uri).st_mtime_ns for rel, uri in pngs(out).items()}
    assert 0 < len(before) < n
    for uri in pngs(out).values():
        Image.open(uri).load()  # complete PNGs only: a truncated one fails to load
    summary = run_inference(config(str(tmp_path / "in"), out, weights))
    assert (summary.skipped, summary.written, summary.failed) == (len(before), n - len(before), 0)
    after = pngs(out)
    assert len(after) == n and all(os.stat(after[rel]).st_mtime_ns == t for rel, t in before.items())
    for uri in after.values():
        Image.open(uri).load()


@pytest.mark.parametrize("argv, message", [
    (["--input", "/nonexistent/photos"], "input not found"),
    (["--weights", "NOT_TORCH"], "not a readable torch file"),
    (["--weights", "EMPTY_RUN"], "has no model.pt"),
    (["--output", "UNDER_A_FILE"], "cannot write to --output"),
    (["--image-size", "100"], "not a multiple of 32"),
    (["--runtime", "onnxruntime", "--precision", "bf16"], "--precision bf16 is for --runtime torch"),
    (["--runtime", "onnxruntime", "--num-gpus-per-actor", "1"], "--num-gpus-per-actor is for --runtime torch"),
    (["--weights", "MODEL_ONNX", "--runtime", "torch"], "is an ONNX model, which runs with --runtime onnxruntime"),
    (["--executor", "local", "--actors", "2"], "--actors is for --executor ray"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, collection, weights, tmp_path):
    root, _ = collection
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "weights.txt").write_text("not torch")
    base = {"--input": root, "--output": str(tmp_path / "masks"), "--weights": weights}
    base.update(dict(zip(argv[::2], argv[1::2])))
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "epoch_0001").mkdir()  # a checkpoint folder without its model.pt
    swap = {"NOT_TORCH": str(tmp_path / "weights.txt"), "UNDER_A_FILE": str(tmp_path / "file" / "masks"),
            "MODEL_ONNX": str(tmp_path / "model.onnx"), "EMPTY_RUN": str(tmp_path / "epoch_0001")}
    base = {k: swap.get(v, v) for k, v in base.items()}
    proc = subprocess.run([sys.executable, "jobs/infer.py", *[x for kv in base.items() for x in kv]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
