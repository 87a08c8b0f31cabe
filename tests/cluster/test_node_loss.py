"""Multi-node runs that lose a worker node, on one machine: training resumes from its last
checkpoint on the node left, and a masking job's re-run completes the masks the lost node left out.

The cluster (tests/cluster/local_cluster.py) mirrors cluster.yaml: a head that runs no tasks and two
worker nodes. Each worker node fits exactly one training worker (3 CPUs, 1.6 per worker, the
rest for Ray Data), so a run of two workers has one on each. Checkpoints go to one local folder
that every node sees: the nodes share this machine, which is what `--storage` must give on a
real cluster (S3). Training is submitted as the README submits it: `ray job submit
--working-dir . -- python jobs/train.py` to the cluster's dashboard, whose job runs its driver on
the head; `ray job status` and `ray job logs` then report on it. The test process never joins
this cluster, so the session's own Ray is left alone. Bulk masking runs `python jobs/infer.py`
joined through RAY_ADDRESS with one model replica on each worker node (a custom resource pins
them, as `--actor-resources` would pin them to GPU nodes), and masks go to a folder every node sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from local_cluster import RAY, ClusterSpec, LocalCluster, ray_cli

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2  # the node is lost after epoch 1: the run resumes from it and trains epoch 2
EPOCH_LINE = re.compile(r"epoch\s+(\d+)\s+train loss")
TRAIN_WORKER = "RayTrainWorker"  # Ray Train's actor class for a training worker
# Ray Train keeps the checkpoints it has registered (those a restart resumes from) in this file
# of the run's folder: a checkpoint listed there is one the run can no longer lose.
REGISTERED = "checkpoint_manager_snapshot.json"


@pytest.fixture
def two_worker_cluster():
    """A head with no CPUs for tasks and two worker nodes of 3 CPUs; closed after the test."""
    root = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's Unix sockets live under it
    cluster = LocalCluster(ClusterSpec(head={"num_cpus": 0}, workers=[{"num_cpus": 3}, {"num_cpus": 3}]), root)
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(condition, what: str, proc: subprocess.Popen | None, log: Path, timeout_s: float = 600):
    """Polls ``condition`` (files and the cluster's actor table signal nothing) until it returns
    something truthy; fails early if the driver (if any) exits."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) while waiting for {what}:\n"
                        + log.read_text()[-4000:])
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)
    return result


def _submit_training(cluster: LocalCluster, job_id: str, data: str, storage: Path, log) -> subprocess.Popen:
    """``ray job submit`` of jobs/train.py, which streams the job's logs and exits with its status."""
    env_vars = {
        # Every node of this cluster sees the storage folder (they share one machine).
        "BASNET_STORAGE_IS_SHARED": "1",
        # After a node is lost Ray Train first asks for the old worker count (its view of the
        # cluster, Ray Data's autoscaling coordinator, is refreshed every 20 s) and waits this long
        # for the placement group before it asks again; 60 s by default. The wait covers nothing
        # else (a placement group of a size that fits is ready at once), so short waits end soon
        # after the view is fresh. A wait that times out is a controller failure, which Ray Train
        # retries without limit by default: it is not charged to --max-failures.
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "8"}
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", job_id,
           "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
           "python", "jobs/train.py", "--data", data, "--storage", str(storage), "--name", "elastic",
           "--image-size", "32", "--epochs", str(EPOCHS), "--batch-size", "4", "--backbone-weights", "none",
           "--num-workers", "2", "--min-workers", "1", "--cpus-per-worker", "1.6", "--max-failures", "4"]
    return subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_submitted_training_resumes_from_its_last_checkpoint_on_the_node_left(two_worker_cluster, tmp_path,
                                                                              runs_folder):
    from basnet.data.sample import generate_sample

    cluster = two_worker_cluster
    data = generate_sample(str(tmp_path / "sample"), n_train=12, n_test=4, size=(32, 32))
    run_dir, log = runs_folder / "elastic", tmp_path / "submit.log"
    job_id = f"basnet-test-{uuid.uuid4().hex[:8]}"
    with log.open("w") as out:
        proc = _submit_training(cluster, job_id, data, runs_folder, out)
    try:
        registered = run_dir / REGISTERED
        _wait_for(lambda: registered.exists() and "epoch_0001" in registered.read_text(),
                  "epoch 1's checkpoint", proc, log)
        before = cluster.actors(TRAIN_WORKER)
        assert sorted(before.values()) == sorted(cluster.worker_node_ids), "one training worker per worker node"

        lost, kept = cluster.worker_node_ids[1], cluster.worker_node_ids[0]
        cluster.remove_worker(lost)
        restarted = _wait_for(lambda: {a: n for a, n in cluster.actors(TRAIN_WORKER).items() if a not in before},
                              "the restarted training worker", proc, log)
        assert list(restarted.values()) == [kept], "the run goes on with one worker, on the node left"
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert f"Job '{job_id}' succeeded" in log.read_text()
    assert f"Job '{job_id}' succeeded" in (status := ray_cli(cluster.env, "job", "status", job_id, "--address", cluster.dashboard_url)).stdout + status.stderr
    logs = ray_cli(cluster.env, "job", "logs", job_id, "--address", cluster.dashboard_url)
    assert logs.returncode == 0, logs.stderr[-2000:]
    printed = logs.stdout
    epochs = [int(e) for e in EPOCH_LINE.findall(printed)]
    # Epochs 0 and 1 ran once: the restart resumed from epoch 1's checkpoint, not from scratch.
    assert epochs.count(0) == 1 and epochs.count(1) == 1, epochs
    assert set(epochs) == set(range(EPOCHS + 1)) and epochs[-1] == EPOCHS, epochs
    best = [line for line in printed.splitlines() if line.startswith("best checkpoint:")]
    assert len(best) == 1 and best[0].startswith(f"best checkpoint: {run_dir}/epoch_"), printed[-3000:]
    assert "(epoch " in best[0] and "val MAE" in best[0], best[0]
    assert (run_dir / f"epoch_{EPOCHS:04d}" / "model.pt").is_file()
    assert f"epoch_{EPOCHS:04d}" in (run_dir / REGISTERED).read_text()



# ---------------------------------------------------------------- bulk masking

# Ray Data names the actor class of a map_batches stage after the stage: one per model replica.
MASK_WORKER = "MapWorker(MapBatches(_PredictorActor))"
N_IMAGES = 120  # enough that the first masks appear well before the job's end
SUMMARY_LINE = re.compile(r"^written (\d+), skipped (\d+), failed (\d+) of (\d+) in", re.MULTILINE)


@pytest.fixture
def two_masker_cluster():
    """A head with no CPUs for tasks and two worker nodes that each fit one model replica (the
    custom resource ``masker``, which ``--actor-resources`` asks for); closed after the test."""
    root = tempfile.mkdtemp(prefix="rm", dir="/tmp")
    node = {"num_cpus": 2, "resources": {"masker": 1}}
    cluster = LocalCluster(ClusterSpec(head={"num_cpus": 0}, workers=[dict(node), dict(node)]), root)
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


def _write_images(root: Path) -> dict[str, tuple[int, int]]:
    """Small JPEGs of varied sizes in three folders: relative path -> (height, width)."""
    from PIL import Image

    from infer_collection import encode, picture

    sizes = {}
    for i in range(N_IMAGES):
        rel, size = f"f{i % 3}/img{i:03d}.jpg", (32 + i % 17, 48 - i % 13)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(Image.fromarray(picture(*size, seed=i)), "JPEG"))
        sizes[rel] = size
    return sizes


def _masks(out: Path) -> dict[str, int]:
    """Relative path -> mtime (ns) of every mask under ``out``; a write's hidden temporary file
    (left behind if its task was killed) is not a mask."""
    if not out.exists():
        return {}
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*.png")
            if not p.name.startswith(".")}


def _start_masking(cluster: LocalCluster, images: Path, out: Path, weights: Path, actors: int,
                   log) -> subprocess.Popen:
    """``jobs/infer.py`` joined to the cluster; each model replica needs one ``masker``."""
    cmd = [sys.executable, "jobs/infer.py", "--input", str(images), "--output", str(out),
           "--weights", str(weights), "--image-size", "32", "--batch-size", "2", "--task-batch-size", "2",
           "--actors", str(actors),
           "--cpus-per-actor", "1", "--actor-resources", '{"masker": 1}']
    return subprocess.Popen(cmd, cwd=REPO, env=dict(cluster.env, RAY_ADDRESS=cluster.address),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _lose_a_node_mid_job(cluster: LocalCluster, proc: subprocess.Popen, out: Path, log: Path) -> None:
    """Once both replicas run, one on each worker node, and the first masks are out: one worker
    node dies, and the job with it (its driver ran there, as a ``ray job submit`` entrypoint that
    asks for CPUs does when the head takes no tasks). Left alone, a driver on the head would see
    Ray Data finish on the node left once the cluster declares the lost node dead."""
    replicas = _wait_for(lambda: len(a := cluster.actors(MASK_WORKER)) == 2 and a, "both model replicas",
                         proc, log)
    assert sorted(replicas.values()) == sorted(cluster.worker_node_ids), "one model replica per worker node"
    _wait_for(lambda: _masks(out), "the first masks", proc, log)
    cluster.remove_worker(cluster.worker_node_ids[1])
    assert proc.poll() is None, "the job ended before the node was lost:\n" + log.read_text()[-4000:]
    survivors = cluster.actor_pids(MASK_WORKER)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # The cluster ends a dead driver's actors and tasks; once its replica's process is gone (CPU
    # replicas write their own masks), nothing of the first run writes any more.
    _wait_for(lambda: not cluster.actors(MASK_WORKER), "the end of the first run's replica", None, log)
    _wait_for(lambda: not any(psutil.pid_exists(pid) for pid in survivors), "the replica's process to exit",
              None, log)


@pytest.mark.slow
def test_masking_rerun_completes_the_masks_of_a_lost_node(two_masker_cluster, tmp_path):
    import torch
    from PIL import Image

    from basnet.model import BASNet

    cluster = two_masker_cluster
    images, out, weights = tmp_path / "images", tmp_path / "masks", tmp_path / "basnet.pth"
    sizes = _write_images(images)
    torch.manual_seed(0)
    torch.save(BASNet().state_dict(), weights)  # random weights in the published file's layout
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with first_log.open("w") as log:
        proc = _start_masking(cluster, images, out, weights, 2, log)
    try:
        _lose_a_node_mid_job(cluster, proc, out, first_log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = _masks(out)
    assert 0 < len(before) < N_IMAGES, "the node was lost mid-job"

    with second_log.open("w") as log:  # on the capacity left: one worker node, one replica
        rerun = _start_masking(cluster, images, out, weights, 1, log)
    try:
        assert rerun.wait(timeout=600) == 0, second_log.read_text()[-4000:]
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
            rerun.wait()

    after = _masks(out)
    assert sorted(after) == sorted(str(Path(rel).with_suffix(".png")) for rel in sizes)
    for rel, (height, width) in sizes.items():
        with Image.open(out / Path(rel).with_suffix(".png")) as mask:
            mask.load()  # a truncated PNG fails here
            assert (mask.height, mask.width) == (height, width), rel
    assert {rel: after[rel] for rel in before} == before, "masks from before the loss are not rewritten"
    counts = [tuple(map(int, m)) for m in SUMMARY_LINE.findall(second_log.read_text())]
    assert counts == [(N_IMAGES - len(before), len(before), 0, N_IMAGES)], second_log.read_text()[-4000:]
