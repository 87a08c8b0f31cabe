"""Bulk masking that knows when it is broken: exit status 1 and one line for the job's own failures,
exit 0 for a run whose failures are some images', and counts that always add up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from basnet import storage
from basnet.infer import listing, ray_pipeline

from conftest import load_job
from infer_collection import encode, picture

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 32

pytestmark = pytest.mark.ray
infer_job = load_job("infer")


class BrokenModelActor(ray_pipeline._PredictorActor):
    """The replica of a model that fails on every batch, as a CUDA fault or a driver mismatch does."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)

        def broken(images):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        self.predictor._forward = broken


class SmallMemoryActor(ray_pipeline._PredictorActor):
    """A replica whose memory holds 2 images: larger batches raise the CPU allocator's error.
    Each forward's batch size, and each refused one as its negative, is logged to ``log``."""

    log = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        forward = self.predictor._forward

        def limited(images):
            with open(self.log, "a") as f:
                f.write(f"{len(images) if len(images) <= 2 else -len(images)}\n")
            if len(images) > 2:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                   f"memory: you tried to allocate {len(images) << 28} bytes.")
            return forward(images)

        self.predictor._forward = limited


def stuck_listing(batch, **kwargs):
    """The listing stage, whose listing of a folder named ``stuck`` never returns (a hung mount)."""
    if any(str(uri).endswith("/stuck") for uri in batch["uri"]):
        threading.Event().wait()
    yield from listing.list_batch(batch, **kwargs)


@pytest.fixture
def swap(monkeypatch):
    """Runs the job with a test's replica class or stage (shipped to the workers by value, as they live
    here): ``swap("_PredictorActor", cls)``."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield lambda name, replacement: monkeypatch.setattr(ray_pipeline, name, replacement)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def write_images(folder: str, n: int, *, corrupt: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        data = encode(Image.fromarray(picture(40, 48, i)), "JPEG")
        with open(os.path.join(folder, f"img{i:03d}.jpg"), "wb") as f:
            f.write(data[: len(data) // 3] if i < corrupt else data)


def run_job(args: list[str], capfd) -> tuple[int, list[str], str]:
    """Runs jobs/infer.py's main in this process (the session's Ray); returns the exit status, the
    stderr lines that are the job's own verdict (``error:``/``failed:``), and stdout."""
    capfd.readouterr()
    status = infer_job.main([*args, "--image-size", str(SIZE), "--batch-size", "8", "--task-batch-size", "4"])
    out, err = capfd.readouterr()
    return status, [line for line in err.splitlines() if line.startswith(("error:", "failed:"))], out


def manifest_rows(output: str) -> list[dict]:
    parts = storage.list_files(os.path.join(output, "_manifest"), [".parquet"])
    return [row for part in parts for row in pq.read_table(part).to_pylist()]


def counts_add_up(output: str, n: int) -> dict[str, int]:
    rows = manifest_rows(output)
    statuses = [r["status"] for r in rows]
    counts = {s: statuses.count(s) for s in ("written", "skipped", "failed")}
    assert len(rows) == n and sum(counts.values()) == n, counts
    written = storage.list_files(output, [".png"])
    assert len(written) == counts["written"]
    return counts


def test_a_model_that_fails_on_every_batch_exits_1_with_one_line_naming_the_error(
        ray_session, weights, tmp_path, capfd, swap):
    swap("_PredictorActor", BrokenModelActor)
    write_images(str(tmp_path / "in"), 6)
    status, verdict, out = run_job(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                    "--weights", weights], capfd)
    assert status == 1
    assert len(verdict) == 1 and verdict[0].startswith("failed: the model failed 3 times"), verdict
    assert "illegal memory access" in verdict[0]
    assert not storage.list_files(str(tmp_path / "out"), [".png"])


def test_in_this_process_a_model_failing_after_two_batches_is_rebuilt_twice_then_exits_1_keeping_the_written_rows(
        weights, tmp_path, capfd, monkeypatch):
    from basnet.infer.predictor import MaskPredictor

    builds, calls = [], []
    build, forward = MaskPredictor.__init__, MaskPredictor._forward

    def counted(self, *args, **kwargs):
        builds.append(1)
        build(self, *args, **kwargs)

    def breaks_after_two(self, images):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(self, images)

    monkeypatch.setattr(MaskPredictor, "__init__", counted)
    monkeypatch.setattr(MaskPredictor, "_forward", breaks_after_two)
    write_images(str(tmp_path / "in"), 12)
    out = str(tmp_path / "out")
    capfd.readouterr()
    status = infer_job.main(["--input", str(tmp_path / "in"), "--output", out, "--weights", weights,
                             "--image-size", str(SIZE), "--batch-size", "2", "--executor", "local"])
    verdict = [line for line in capfd.readouterr().err.splitlines() if line.startswith(("error:", "failed:"))]
    assert status == 1 and len(builds) == 3
    assert len(verdict) == 1 and verdict[0].startswith("failed: the model failed 3 times"), verdict
    assert "illegal memory access" in verdict[0]
    rows = manifest_rows(out)
    assert sorted(r["output"] for r in rows if r["status"] == "written") == sorted(storage.list_files(out, [".png"]))
    assert len(rows) == 4  # the two batches the model finished, written before the run stopped
    assert not [t for t in threading.enumerate()  # decoding and writing stopped
                if t.name == "watched-masking input" or t.name.startswith("basnet-write")]


def test_out_of_memory_above_two_images_halves_the_batch_and_writes_every_mask(
        ray_session, weights, tmp_path, capfd, swap):
    SmallMemoryActor.log = str(tmp_path / "batches.txt")
    swap("_PredictorActor", SmallMemoryActor)
    write_images(str(tmp_path / "in"), 12)
    status, verdict, out = run_job(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                    "--weights", weights], capfd)
    assert status == 0 and not verdict, verdict
    assert "written 12, skipped 0, failed 0 of 12" in out
    assert counts_add_up(str(tmp_path / "out"), 12)["written"] == 12
    sizes = [int(line) for line in open(SmallMemoryActor.log).read().split()]
    refused, done = [-s for s in sizes if s < 0], [s for s in sizes if s > 0]
    assert refused and min(refused) > 2 and max(done) == 2 and sum(done) == 12, sizes


@pytest.mark.parametrize("fraction, expected", [(None, 1), ("1", 0)])
def test_sixty_percent_corrupt_files_exit_1_by_default_and_0_when_allowed(
        fraction, expected, ray_session, weights, tmp_path, capfd):
    write_images(str(tmp_path / "in"), 10, corrupt=6)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", weights]
    status, verdict, out = run_job(args + (["--max-failed-fraction", fraction] if fraction else []), capfd)
    assert status == expected
    counts = counts_add_up(str(tmp_path / "out"), 10)
    assert counts == {"written": 4, "skipped": 0, "failed": 6}
    if expected:
        assert len(verdict) == 1 and "6 of 10 inputs failed (60%), above --max-failed-fraction 0.5" in verdict[0]
    else:
        assert "written 4, skipped 0, failed 6 of 10" in out and not verdict


def test_a_pipeline_that_stops_delivering_exits_1_in_one_line_keeping_its_masks_for_the_rerun(
        ray_session, weights, tmp_path, capfd, monkeypatch, swap):
    write_images(str(tmp_path / "in/a"), 8)
    write_images(str(tmp_path / "in/stuck"), 1)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", weights]
    swap("list_batch", stuck_listing)  # a/ is listed and masked; the listing of stuck/ never comes back
    start = time.monotonic()
    status, verdict, _ = run_job(args + ["--stall-timeout", "15"], capfd)
    print(f"stalled job ended after {time.monotonic() - start:.0f} s: {verdict}")
    assert status == 1 and len(verdict) == 1, verdict
    assert verdict[0].startswith("failed: the masking stream delivered nothing for 1")
    assert "(--stall-timeout 15)" in verdict[0] and "cluster free " in verdict[0]
    assert "dataset masking_" in verdict[0] and "MapBatches(stuck_listing) RUNNING" in verdict[0]
    assert sorted(os.listdir(tmp_path / "out/a")) == [f"img00{i}.png" for i in range(8)]
    assert not os.path.exists(tmp_path / "out/stuck")
    monkeypatch.undo()  # the mount is back: the re-run masks what the stalled one did not
    status, verdict, out = run_job(args, capfd)
    assert status == 0 and "written 1, skipped 8, failed 0 of 9" in out, (verdict, out)


def test_a_run_that_wrote_nothing_while_inputs_failed_exits_1(ray_session, weights, tmp_path, capfd):
    write_images(str(tmp_path / "in"), 3, corrupt=3)
    status, verdict, _ = run_job(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                  "--weights", weights, "--max-failed-fraction", "1"], capfd)
    assert status == 1 and len(verdict) == 1 and verdict[0].startswith("failed: wrote no mask"), verdict
    assert counts_add_up(str(tmp_path / "out"), 3)["failed"] == 3


def test_dry_run_prints_the_counts_examples_and_files_that_are_not_images_without_the_model(ray_session, weights, tmp_path, capfd):
    write_images(str(tmp_path / "in/a"), 5)
    write_images(str(tmp_path / "in/b"), 2)
    (tmp_path / "in/b/../b/x.JPG").write_bytes(b"x")  # a second image named x in b: no collision
    for other in ("a/clip.mov", "a/clip2.mov", "b/readme.md"):
        (tmp_path / "in" / other).write_bytes(b"not an image")
    os.makedirs(tmp_path / "out/a")
    (tmp_path / "out/a/img000.png").write_bytes(b"done")
    # A torch file's first bytes (the driver checks them) and nothing loadable after: a dry run never loads it.
    (tmp_path / "not-torch.pth").write_bytes(b"PK\x03\x04 the model is never loaded")
    status, verdict, out = run_job(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                                    "--weights", str(tmp_path / "not-torch.pth"), "--dry-run"], capfd)
    assert status == 0 and not verdict
    assert out.splitlines()[0].startswith("dry run: to mask 7 image(s), to skip 1 (mask exists), refused 0")
    assert f"  mask: {tmp_path}/in/a/img001.jpg -> {tmp_path}/out/a/img001.png" in out
    assert f"  skip: {tmp_path}/in/a/img000.jpg -> {tmp_path}/out/a/img000.png" in out
    assert "3 files are not images (.mov 2, .md 1)" in out.splitlines()
    assert os.listdir(tmp_path / "out") == ["a"]  # nothing written: no config, no manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_with_auth(tmp_path):
    """A second moto server that checks signatures (after the setup requests): a bucket with 4 images
    and a user whose key is valid, so a wrong secret is the only fault."""
    import boto3

    setup_requests = 3 + 1 + 4  # user, policy, key; bucket; objects
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_requests)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)  # polling a socket that has no event to await
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        iam.create_user(UserName="masker")
        iam.put_user_policy(UserName="masker", PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName="masker")["AccessKey"]
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="photos")
        for i in range(4):
            s3.put_object(Bucket="photos", Key=f"in/img{i}.jpg", Body=encode(Image.fromarray(picture(40, 48, i)),
                                                                               "JPEG"))
        good = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        assert good.list_objects_v2(Bucket="photos", Prefix="in/")["KeyCount"] == 4  # the right secret works
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_s3_input_with_a_wrong_secret_key_stops_early_with_exit_1_and_the_access_denied_cause(
        s3_with_auth, weights, tmp_path):
    endpoint, key_id, secret = s3_with_auth
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id,
           "AWS_SECRET_ACCESS_KEY": secret[::-1] + "x"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "jobs/infer.py", "--input", "s3://photos/in", "--output",
                           str(tmp_path / "out"), "--weights", weights, "--image-size", str(SIZE)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("failed: --input s3://photos/in: access refused"), proc.stderr
    assert "SignatureDoesNotMatch" in lines[0] or "ACCESS_DENIED" in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "out")
    print(f"wrong secret refused in {time.monotonic() - start:.1f} s: {lines[0]}")
    right = subprocess.run([sys.executable, "jobs/infer.py", "--input", "s3://photos/in", "--output",
                            str(tmp_path / "out"), "--weights", weights, "--dry-run"],
                           cwd=REPO, env={**env, "AWS_SECRET_ACCESS_KEY": secret}, capture_output=True, text=True,
                           timeout=300)
    assert right.returncode == 0 and "to mask 4 image(s)" in right.stdout, right.stderr  # the secret was the fault


def test_a_rerun_exits_as_the_first_run_did_and_counts_add_up_when_done_skipped_and_failed_inputs_mix(
        ray_session, weights, tmp_path, capfd):
    write_images(str(tmp_path / "in"), 8, corrupt=2)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--weights", weights]
    assert run_job(args, capfd)[0] == 0
    status, verdict, out = run_job(args, capfd)  # nothing left to do but the two bad files, which fail again
    assert status == 0 and not verdict and "written 0, skipped 6, failed 2 of 8" in out, (verdict, out)
    for i in range(2, 8, 2):
        os.remove(tmp_path / f"out/img{i:03d}.png")
    status, verdict, out = run_job(args, capfd)
    assert status == 0 and "written 3, skipped 3, failed 2 of 8" in out, out
    rows = [r for r in manifest_rows(str(tmp_path / "out")) if r["run_id"] == manifest_rows(
        str(tmp_path / "out"))[-1]["run_id"]]
    assert sorted(r["status"] for r in rows) == ["failed"] * 2 + ["skipped"] * 3 + ["written"] * 3
    assert all(np.isclose(r["seconds"], sum(r[s] for s in ("list_s", "read_s", "decode_s", "infer_s", "encode_s",
                                                           "write_s"))) for r in rows)
