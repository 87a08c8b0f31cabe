"""The GPU path on a real GPU: bf16 training killed and resumed, two workers sharing one GPU, and
masks from a GPU actor. Every test here is marked ``gpu``: skipped (with the reason) without CUDA.

``bench/gpu_check.py`` runs these first. They import nothing beyond the runtime (no moto, boto3 or
s3fs), so they run on a stock PyTorch image with Ray and kornia installed from wheels.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from basnet import storage
from basnet.checkpoint import load_checkpoint
from basnet.train.config import TrainConfig

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
SIZE = 64


def gpu_config(tmp_path, sample_root, **overrides) -> TrainConfig:
    base = dict(data=sample_root, storage=str(tmp_path / "runs"), name="gpu", epochs=3, batch_size=4,
                image_size=SIZE, crop_size=SIZE, backbone_weights="none", max_failures=0, gpu=True,
                precision="bf16")
    return TrainConfig(**{**base, **overrides}).resolved()


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the training job exited ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s:.0f} s"
        time.sleep(0.5)  # polling a file another process writes: there is no event to wait on


def test_bf16_training_killed_after_epoch_1_resumes_with_its_optimizer_state_on_the_gpu(
        ray_session, tmp_path, sample_root):
    from basnet.train.ray_trainer import fit

    cfg = gpu_config(tmp_path, sample_root)
    argv = [sys.executable, "jobs/train.py", "--data", sample_root, "--storage", cfg.storage, "--name", cfg.name,
            "--epochs", "3", "--batch-size", "4", "--image-size", str(SIZE), "--crop-size", str(SIZE),
            "--backbone-weights", "none", "--gpu", "--precision", "bf16", "--max-failures", "0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_file(Path(cfg.storage) / cfg.name / "epoch_0001" / "model.pt", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    outcome = fit(cfg)  # the same name: resumes from the last checkpoint the killed run left
    assert outcome.epochs_run == 3
    assert outcome.loop_result["optimizer_state_devices"] == ["cuda:0"]
    losses = [load_checkpoint(storage.join(cfg.storage, cfg.name, f"epoch_{e:04d}"))["metrics"]["train_loss"]
              for e in (1, 3)]
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses


def test_two_workers_sharing_one_gpu_end_with_identical_replicas(ray_session, tmp_path, sample_root):
    from basnet.train.ray_trainer import fit

    outcome = fit(gpu_config(tmp_path, sample_root, epochs=1, num_workers=2, gpus_per_worker=0.5))
    digests = outcome.loop_result["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_bf16_masks_of_the_gpu_actor_are_within_one_grey_level_of_fp32_cpu_masks(ray_session, tmp_path, sample_root):
    from basnet.imaging import decode_image, decode_mask, render_output
    from basnet.infer.config import InferConfig
    from basnet.infer.manifest import read_run_manifest
    from basnet.infer.predictor import MaskPredictor
    from basnet.infer.ray_pipeline import run_inference
    from basnet.model import BASNet
    from basnet.transforms import resize_image

    torch.manual_seed(0)
    weights = str(tmp_path / "basnet.pth")
    state = BASNet().state_dict()
    torch.save(state, weights)
    images = storage.join(sample_root, "DUTS-TE", "DUTS-TE-Image")
    summary = run_inference(InferConfig(input=images, output=str(tmp_path / "masks"), weights=weights,
                                        image_size=SIZE, precision="bf16", num_gpus_per_actor=1))
    rows = [r for r in read_run_manifest(summary).to_pylist() if r["status"] == "written"]
    assert rows and summary.failed == 0
    cpu = MaskPredictor(state, device=torch.device("cpu"), precision="fp32", image_size=SIZE)
    diffs = []
    for row in rows:
        image = decode_image(storage.read_bytes(row["input"]))
        prob = cpu.predict(resize_image(image, SIZE)[None])[0]
        expected = decode_mask(render_output(prob, image.shape[0], image.shape[1], fmt="mask")).astype(np.int16)
        diffs.append(np.abs(decode_mask(storage.read_bytes(row["output"])).astype(np.int16) - expected))
    mean = float(np.mean([d.mean() for d in diffs]))
    print(f"bf16 GPU vs fp32 CPU masks: mean {mean:.3f}, max {max(int(d.max()) for d in diffs)} grey levels")
    assert mean < 1.0
