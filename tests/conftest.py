"""Shared fixtures: one local Ray per test session, an S3-compatible server on 127.0.0.1, the sample.

The S3 variables are set at import, before any Ray worker starts, so every worker of the
session's Ray sees the same endpoint as the test process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from basnet.ray_init import free_port

REPO = Path(__file__).resolve().parents[1]


S3_PORT = free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Plain request bodies instead of the SDKs' default aws-chunked ones with a checksum trailer:
    # moto's server decodes those by concatenating bytes chunk by chunk, which made a 1 GB
    # checkpoint's upload 13.0 s instead of 7.1 s here. The project's code is the same either way.
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # The session's optimised ONNX graphs (basnet/export/ort.py) go to a folder of its own, not ~/.cache.
    "BASNET_ORT_CACHE": tempfile.mkdtemp(prefix="basnet-ort-cache-"),
})
os.environ.pop("RAY_ADDRESS", None)  # never join a cluster the developer happens to run


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is present and are skipped, with the reason, elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def load_job(name: str):
    """``jobs/<name>.py`` as a module, so a test can call its ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A training checkpoint is 1 GB (the model and Adam's two moments). This machine's disk takes it in
# 5-8 s (about 150 MB/s for data that is not zeros); a folder in memory takes it in 0.4 s. The tests
# that write several (training and its resume, node loss, the submitted job) keep their runs in
# memory; what they prove does not depend on the medium, and the write to a local folder is the same
# code path (basnet.storage). The search's trials stay on disk: with their checkpoints in memory the
# machine reached 86 % of its memory, close to where Ray's memory monitor kills workers (95 %). See
# docs/design.md, "Where the test suite's time goes".
MEMORY = "/dev/shm"


@pytest.fixture
def runs_folder():
    """A folder for one test's training runs and their 1 GB checkpoints: in memory where this
    machine has room there (8 GB), else on the temporary disk; removed after the test."""
    if os.path.isdir(MEMORY) and shutil.disk_usage(MEMORY).free > 8 * 2**30:
        folder = Path(tempfile.mkdtemp(prefix="basnet-runs-", dir=MEMORY))
    else:
        folder = Path(tempfile.mkdtemp(prefix="basnet-runs-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on loopback; yields the endpoint URL."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)  # polling a socket that has no event to await
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields its ``s3://`` URI, and deletes the bucket and everything in
    it after the test (the server keeps objects for the whole session otherwise)."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{time.monotonic_ns() % 10**6}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> str:
    """Random BASNet weights in the published basnet.pth's format, written once per session (the
    masking tests' model; a test module may define its own ``weights``)."""
    import torch

    from basnet.model import BASNet

    path = str(tmp_path_factory.mktemp("weights") / "basnet.pth")
    torch.manual_seed(0)
    torch.save(BASNet().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def exported(weights, tmp_path_factory) -> tuple[str, str]:
    """``jobs/export.py`` on the session's random weights at 64 px, as a user runs it: its own check
    passes. Returns the ONNX file's path (alone in its folder) and what the job printed."""
    out = str(tmp_path_factory.mktemp("onnx") / "basnet.onnx")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "export.py"), "--weights", weights, "--out", out,
                           "--image-size", "64"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> str:
    """The embedded sample, generated once per session, small."""
    from basnet.data.sample import generate_sample

    return generate_sample(str(tmp_path_factory.mktemp("sample")), n_train=16, n_test=8, size=(40, 32))


@pytest.fixture(scope="session")
def ray_session(sample_root):
    """One local Ray (2 CPUs) shared by every Ray test of the session."""
    import ray

    from basnet.ray_init import init_ray

    os.environ["BASNET_SAMPLE_DIR"] = str(Path(sample_root).parent / "default-sample")
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_ray_leftovers(request):
    """A test on the session's Ray leaves no actor, placement group or running task behind: one that
    does fails (its teardown errors, naming what it left) and is cleaned up, so the next test does not
    starve for the CPUs the leak holds."""
    if "ray_session" not in request.fixturenames:
        yield
        return
    from ray_leaks import clean_up, leftovers, snapshot

    before = snapshot()
    yield
    if left := leftovers(before):
        try:
            clean_up(before)
        finally:
            pytest.fail(f"{request.node.name} left running on the session's Ray: {', '.join(left)}",
                        pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["BASNET_ORT_CACHE"], ignore_errors=True)  # up to 0.7 GB of optimised graphs
