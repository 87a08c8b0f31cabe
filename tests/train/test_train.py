"""The training engine and the Ray Train job on the embedded sample (32 px, CPU)."""

from __future__ import annotations

import collections
import functools
import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from basnet import storage
from basnet.checkpoint import checkpoint_config, load_model
from basnet.config import parse_config
from basnet.data.discovery import discover
from basnet.errors import ConfigError
from basnet.imaging import decode_image, decode_mask
from basnet.loss import HybridLoss
from basnet.model import BASNet
from basnet.train.config import TrainConfig
from basnet.train.curves import CURVES_FILE, CURVES_SIZE, read_history
from basnet.train.engine import train_step
from basnet.transforms import resize_image, resize_mask

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(tmp_path, sample_root, **overrides) -> TrainConfig:
    base = dict(data=sample_root, storage=str(tmp_path / "runs"), name="t", epochs=2, batch_size=4,
                image_size=32, crop_size=32, backbone_weights="none", max_failures=0)
    base.update(overrides)
    return TrainConfig(**base).resolved()


def test_training_step_overfits_a_fixed_tiny_batch(sample_root):
    pairs = discover(sample_root).train[:2]
    image = np.stack([resize_image(decode_image(storage.read_bytes(p.image)), 32) for p in pairs])
    mask = np.stack([resize_mask(decode_mask(storage.read_bytes(p.mask)), 32) for p in pairs])
    batch = {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)}
    torch.manual_seed(0)
    model = BASNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = HybridLoss()
    device = torch.device("cpu")
    losses = [train_step(model, batch, loss_fn, optimizer, device=device) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_config_file_gives_defaults_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.0005\nname: fromfile\n")
    cfg = parse_config(TrainConfig, ["--config", str(path), "--epochs", "9"], "t")
    assert (cfg.epochs, cfg.lr, cfg.name) == (9, 0.0005, "fromfile")


def test_config_file_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 7\n")
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        parse_config(TrainConfig, ["--config", str(path)], "t")


def test_sample_defaults_apply_only_without_data():
    assert TrainConfig().resolved().image_size == 64
    cfg = TrainConfig(data="/x").resolved()
    assert (cfg.image_size, cfg.crop_size, cfg.backbone_weights) == (256, 224, "imagenet")


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "100"], "not a multiple of 32"),
    (["--epochs", "0"], "must be positive"),
    (["--data", "/nonexistent/duts"], "DUTS-TR"),
    (["--eval-data", "/nonexistent/duts"], "/nonexistent/duts does not exist"),
])
def test_train_job_bad_arguments_exit_2_with_one_line(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "jobs/train.py", "--storage", str(tmp_path), *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last


def test_train_help_documents_every_option():
    proc = subprocess.run([sys.executable, "jobs/train.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--data", "--storage", "--name", "--epochs", "--batch-size", "--image-size", "--lr",
                 "--num-workers", "--gpu", "--no-gpu", "--backbone-weights", "--max-failures",
                 "--skip-unpaired", "--config", "--eval-data"):
        assert flag in proc.stdout


def sample_masks(sample_root: str, weights_state: dict, **options) -> list[np.ndarray]:
    """8-bit masks of the sample's held-out images at 32 px, through the bulk-masking predictor."""
    from basnet.imaging import render_output
    from basnet.infer.predictor import MaskPredictor

    predictor = MaskPredictor(weights_state, device=torch.device("cpu"), image_size=32, **options)
    masks = []
    for uri in storage.list_files(storage.join(sample_root, "DUTS-TE", "DUTS-TE-Image")):
        image = decode_image(storage.read_bytes(uri))
        prob = predictor.predict(resize_image(image, 32)[None])[0]
        masks.append(decode_mask(render_output(prob, image.shape[0], image.shape[1], fmt="mask")).astype(np.int16))
    return masks


def worker_lines_until(capfd, line: str, timeout_s: float = 120) -> str:
    """The driver's stdout up to ``line``, a line a training worker prints. Ray's log monitor forwards
    worker stdout to the driver on its own schedule, so it can arrive after ``fit`` has returned; lines
    of one worker keep their order, so once ``line`` is here every line printed before it is too."""
    printed, deadline = "", time.monotonic() + timeout_s
    while True:
        printed += capfd.readouterr().out
        if line in printed or time.monotonic() > deadline:
            return printed
        time.sleep(0.1)  # nothing to wait on: the lines come through the captured file descriptor


@pytest.mark.ray
def test_bf16_on_two_workers_and_s3_checkpoints_every_epoch_resumes_into_its_mlflow_run_and_stops_when_validation_stalls(
        ray_session, s3_bucket, tmp_path, sample_root, capfd, monkeypatch):
    # Two runs show it all (each Ray Train run costs about 30 s here, and each 1 GB checkpoint about
    # a minute on the S3 test server beside Ray): S3 data and checkpoints, two workers (0.5 CPU each)
    # in step, bf16, a second run resuming from the first one's checkpoint and continuing its
    # history and its MLflow run, the stall watchdog ending that second run when its validation
    # read hangs, and bf16 masks of the trained weights.
    from mlflow.tracking import MlflowClient

    from basnet.errors import JobFailed
    from basnet.train import ray_trainer

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store, for reading back here
    data, run_dir = f"{s3_bucket}/duts", f"{s3_bucket}/runs/t"
    for uri in storage.list_files(sample_root):
        storage.write_bytes(f"{data}/{storage.relative_to(uri, sample_root)}", storage.read_bytes(uri))
    run = dict(precision="bf16", storage=f"{s3_bucket}/runs", num_workers=2, cpus_per_worker=0.5,
               tracking="mlflow", log_every=1)
    # Validation passes 1 and 2 (epochs 0 and 1, the first run) deliver; the third hangs.
    monkeypatch.setattr(ray_trainer, "validation_dataset", functools.partial(
        stalling_validation, count=str(tmp_path / "passes"), deliver=2))

    first = ray_trainer.fit(tiny_config(tmp_path, data, epochs=1, **run))
    printed = worker_lines_until(capfd, "epoch   1  train loss")
    assert "epoch   0" in printed and "epoch   1" in printed
    assert first.epochs_run == 1 and first.best_checkpoint == f"{run_dir}/epoch_0001"
    assert len(first.split.train) == 16 and first.split.val_source == "DUTS-TE"
    digests = first.loop_result["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # the two replicas ended identical
    assert checkpoint_config(f"{run_dir}/epoch_0001")["data"] == data
    assert Image.open(io.BytesIO(storage.read_bytes(f"{run_dir}/{CURVES_FILE}"))).size == CURVES_SIZE
    assert f"curves: {run_dir}/{CURVES_FILE}" in printed

    # One epoch more: the run resumes from epoch 1's checkpoint, trains epoch 2, and its validation
    # read never returns (a hung mount, a dead server): the watchdog fails the run in one line.
    start = time.monotonic()
    with pytest.raises(JobFailed) as info:
        ray_trainer.fit(tiny_config(tmp_path, data, epochs=2, stall_timeout=15, **run))
    message = str(info.value)
    print(f"stalled run failed after {time.monotonic() - start:.0f} s: {message}")
    assert "\n" not in message and message.startswith("the validation stream delivered nothing for 1")
    assert "(--stall-timeout 15)" in message and "cluster free " in message and "dataset val_" in message
    printed = worker_lines_until(capfd, "epoch   2  step")
    assert "epoch   2  step 1/" in printed  # it trained epoch 2, and nothing before it again:
    assert "epoch   1 " not in printed and "epoch   0" not in printed
    _, folders = storage.list_folder(run_dir)
    assert [f for f in folders if f.startswith("epoch_")] == ["epoch_0001"]  # no checkpoint unvalidated
    history = read_history(run_dir)
    assert [r["epoch"] for r in history] == [0, 1]  # the untrained epoch 0 included
    assert history[0]["train_loss"] is None and history[1]["train_loss"] > 0
    assert all(0 <= r["val_mae"] <= 1 for r in history)

    # MLflow: one run for both processes of both runs, rank 0's, named after the training run.
    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "basnet-ray"]
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "t" and tracked.data.params["precision"] == "bf16"
    assert tracked.data.params["tracking"] == "mlflow"

    def metric(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, key)]

    assert dict(metric("epoch/val_mae")) == pytest.approx({r["epoch"]: r["val_mae"] for r in history})
    assert [step for step, _ in metric("epoch/train_loss")] == [1]  # epoch 0 trained nothing
    assert [value for _, value in metric("epoch/lr")] == pytest.approx([1e-3] * 2)
    # The steps of epoch 1 (first run) and epoch 2 (second run) follow on, each once, as many each.
    logged = collections.Counter(step for step, _ in metric("step/loss"))
    steps = sorted(logged)
    assert len(steps) >= 2 and len(steps) % 2 == 0 and steps == list(range(steps[0], steps[-1] + 1)), steps
    assert set(logged.values()) == {1}, logged

    # The bf16-trained weights mask in bf16 within 1 grey level (on average) of fp32.
    state = load_model(first.best_checkpoint).state_dict()
    fp32, bf16 = sample_masks(sample_root, state, precision="fp32"), sample_masks(sample_root, state, precision="bf16")
    diffs = [np.abs(a - b) for a, b in zip(fp32, bf16)]
    mean, largest = float(np.mean([d.mean() for d in diffs])), max(int(d.max()) for d in diffs)
    print(f"bf16 vs fp32 masks of the bf16-trained checkpoint: mean {mean:.3f}, largest {largest} grey levels")
    assert mean < 1.0


def test_compiled_masking_equals_eager_masking_within_one_grey_level(sample_root):
    torch.manual_seed(0)
    state = BASNet().eval().state_dict()
    eager, compiled = sample_masks(sample_root, state), sample_masks(sample_root, state, compile=True)
    largest = max(int(np.abs(a - b).max()) for a, b in zip(eager, compiled))
    print(f"torch.compile vs eager masks: largest difference {largest} grey levels")
    assert largest <= 1


def stalling_validation(pairs, *, image_size: int, count: str, deliver: int):
    """The validation dataset, whose read blocks for good from its ``deliver + 1``-th pass on (each
    pass is one read task: 8 images make one block). ``count`` is a file with a line per pass."""
    from basnet.data.ray_pipeline import load_batch, pairs_dataset

    def read(batch):
        with open(count, "a+") as f:
            f.write("pass\n")
            f.seek(0)
            passes = len(f.read().split())
        if passes > deliver:
            threading.Event().wait()  # a read that never returns (a hung mount, a dead server)
        return load_batch(batch, size=image_size)

    return pairs_dataset(pairs).map_batches(read, batch_size=8, batch_format="numpy")
