"""The masking service end to end: ``python jobs/serve.py`` as a user runs it (its own local Ray and
Serve on 127.0.0.1), random weights, a real HTTP client, a real headless Chromium for the page."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from basnet.client import MaskingError, mask, mask_with_quality
from basnet.imaging import FORMATS
from basnet.infer.config import InferConfig
from basnet.infer.manifest import read_run_manifest
from basnet.infer.ray_pipeline import run_inference
from basnet.ray_init import free_port
from basnet.serve.config import ServeConfig

from infer_collection import encode, picture, rotated

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
MAX_PIXELS = 20_000
MAX_BYTES = 300_000
BATCH_WAIT_MS = 200  # long enough that requests sent together share a batch

pytestmark = pytest.mark.ray


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, banner: str) -> None:
        self.url, self.proc, self.banner = url, proc, banner
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        finally:
            conn.close()

    def post(self, data: bytes, query: str = "", content_type: str = "image/jpeg") -> tuple[int, str, bytes]:
        return self.request("POST", "/mask" + query, data, {"Content-Type": content_type})

    def info(self) -> dict:
        status, _, body = self.request("GET", "/info")
        assert status == 200
        return json.loads(body)


@contextlib.contextmanager
def sigint_as_in_a_terminal():
    """Processes started inside get Ctrl-C's default action. A test run started in the background
    (``make test &`` from a script) ignores SIGINT, and so would every process it starts: the
    service would then not stop when the fixture sends SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler installed outside Python, which cannot be restored
            signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    """``jobs/serve.py`` in its own process; stopped with SIGINT at the end, which must exit 0."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    port = free_port()
    cmd = [sys.executable, str(REPO / "jobs" / "serve.py"), "--weights", weights, "--port", str(port),
           "--image-size", str(SIZE), "--max-batch-size", "4", "--batch-wait-ms", str(BATCH_WAIT_MS),
           "--max-pixels", str(MAX_PIXELS), "--max-bytes", str(MAX_BYTES), "--num-gpus-per-replica", "0"]
    with open(log, "w") as err, sigint_as_in_a_terminal():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    banner = proc.stdout.readline()  # blocks until the app is running (or the process ends)
    if not banner.startswith("serving"):
        proc.kill()
        pytest.fail(f"the service did not start: {banner!r} {log.read_text()[-3000:]}")
    yield Server(f"http://127.0.0.1:{port}/", proc, banner)
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a service left running would starve the rest of the suite
        proc.kill()
        proc.communicate()
        pytest.fail(f"the service did not stop within 120 s of SIGINT: {log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "stopping" in rest


@pytest.fixture(scope="module")
def held_out(sample_root, tmp_path_factory) -> dict[str, bytes]:
    """The sample's held-out images plus an EXIF-rotated JPEG, as files and bytes."""
    folder = Path(sample_root) / "DUTS-TE" / "DUTS-TE-Image"
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    files["exif.jpg"] = rotated(24, 40, 5, "JPEG")
    root = tmp_path_factory.mktemp("held_out")
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_help_documents_every_option_and_bad_arguments_exit_2_before_ray(weights, tmp_path):
    job = [sys.executable, str(REPO / "jobs" / "serve.py")]
    shown = subprocess.run([*job, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    flags = ["--" + name.replace("_", "-") for name in ServeConfig.__dataclass_fields__]
    assert [f for f in flags if f not in shown.stdout] == []
    with socket_taken() as taken:
        cases = {
            "--weights is required": [],
            "checkpoint not found": ["--weights", str(tmp_path / "missing.pth")],
            "--port must lie in [1, 65535], got 70000": ["--weights", weights, "--port", "70000"],
            f"cannot listen on 127.0.0.1:{taken}": ["--weights", weights, "--port", str(taken)],
            "--num-replicas must be a positive number or 'auto'": ["--weights", weights, "--num-replicas", "0"],
            "--image-size 50 is not a multiple of 32": ["--weights", weights, "--image-size", "50"],
            "--batch-wait-ms must be 0 or more, got -1.0": ["--weights", weights, "--batch-wait-ms", "-1"],
        }
        for expected, args in cases.items():
            proc = subprocess.run([*job, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert proc.returncode == 2, (args, proc.stderr)
            assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
            assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
            assert "ray" not in proc.stdout.lower()  # Ray never started
    # What only the cluster can tell is refused in one line too, instead of Serve waiting forever.
    proc = subprocess.run([*job, "--weights", weights, "--port", str(free_port()), "--num-gpus-per-replica", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: 1 replica(s) x 1 GPU need more than the cluster's 0 GPU: lower --num-gpus-per-replica"), proc.stderr


class socket_taken:
    """A port something already listens on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_healthz_and_info_describe_the_service(server, weights):
    status, kind, body = server.request("GET", "/healthz")
    assert (status, kind, json.loads(body)) == (200, "application/json", {"status": "ok"})
    info = server.info()
    assert {k: info[k] for k in ("weights", "image_size", "replicas", "max_batch_size")} == {
        "weights": weights, "image_size": SIZE, "replicas": 1, "max_batch_size": 4}
    assert info["default_refine"] == {"mask": "none", "binary": "none", "rgba": "guided"}
    assert (info["default_normalize"], info["default_on_no_object"]) == ("minmax", "keep")
    # on CPU: fp32, and the replica's CPUs (all of this machine's, as the banner says) as its threads
    assert (info["device"], info["precision"]) == ("cpu", "fp32")
    assert f"{info['threads']} CPU and 0 GPU each" in server.banner
    assert info["replica"]["pid"] > 0 and info["replica"]["rss_bytes"] > 0
    assert server.url in server.banner


def test_served_masks_and_their_quality_headers_equal_the_bulk_jobs_in_every_format_and_refinement(
        ray_session, server, held_out, weights, sample_root, tmp_path):
    """Sequential requests are batches of one, so the bulk job runs with --batch-size 1: the same
    model call on the same pixels (batches of other sizes can differ by 1e-6 before rounding).
    Every format, and both refinements: plain masks (here the raw sigmoid, ?normalize=none, as the
    job's --normalize none), guided binary masks, and cut-outs with their default (guided, with
    estimated foreground colours; asked without ?refine=, then checked to be what ?refine=guided
    gives and not what ?refine=none gives). The answers' X-Mask-Confidence and X-Mask-No-Object
    headers carry the manifest's figures, exactly; /info counts them."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    # Two held-out images and the EXIF-rotated one: each request is a batch of one, so more images
    # would only repeat the same comparison (about 0.4 s a request and a bulk job's image here).
    held_out = {name: held_out[name] for name in [*sorted(set(held_out) - {"exif.jpg"})[:2], "exif.jpg"]}
    for name, data in held_out.items():
        (inputs / name).write_bytes(data)
    before = server.info()["replica"]
    answered = []
    for fmt, refine, normalize in zip(FORMATS, ("none", "guided", None), ("none", None, None)):
        out = tmp_path / fmt
        summary = run_inference(InferConfig(input=str(inputs), output=str(out), weights=weights, image_size=SIZE,
                                            batch_size=1, format=fmt, threshold=0.4, refine=refine,
                                            normalize=normalize or "minmax"))
        manifest = {Path(row["input"]).name: row for row in read_run_manifest(summary).to_pylist()}
        for name, data in held_out.items():
            body, quality = mask_with_quality(server.url, data, format=fmt, threshold=0.4, refine=refine,
                                              normalize=normalize)
            assert body == (out / (Path(name).stem + ".png")).read_bytes(), (fmt, refine, name)
            assert quality == {key: manifest[name][key] for key in ("confidence", "no_object")}, (fmt, name)
            answered.append(quality)
        if refine is None:  # the default is the guided path
            assert body == server.post(data, f"?format={fmt}&refine=guided")[2]
            assert body != server.post(data, f"?format={fmt}&refine=none")[2]
            answered += [quality] * 2
    plain, plain_quality = mask_with_quality(server.url, data, normalize="none")
    stretched, stretched_quality = mask_with_quality(server.url, data)
    assert not np.array_equal(png(plain), png(stretched)) and plain_quality != stretched_quality
    answered += [plain_quality, stretched_quality]  # the figures are of the mask as written: they differ
    after = server.info()["replica"]
    assert after["masks"] - before["masks"] == len(answered)
    assert after["no_object"] - before["no_object"] == sum(q["no_object"] for q in answered)
    deciles = np.subtract(after["confidence_deciles"], before["confidence_deciles"])
    assert list(deciles) == list(np.bincount([min(9, int(q["confidence"] * 10)) for q in answered], minlength=10))
    rotated = png(server.post(held_out["exif.jpg"])[2])
    assert rotated.shape == (40, 24)  # the displayed size, after EXIF orientation


def test_multipart_form_and_raw_body_give_the_same_mask_and_the_client_helper_too(server, held_out, tmp_path):
    name, data = next(iter(held_out.items()))
    raw = server.post(data, "?format=binary")[2]
    boundary = "basnet-test-boundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, kind, body = server.post(form, "?format=binary", f"multipart/form-data; boundary={boundary}")
    assert (status, kind, body) == (200, "image/png", raw)
    assert set(np.unique(png(raw))) <= {0, 255}
    path = tmp_path / name
    path.write_bytes(data)
    assert mask(server.url, path, format="binary") == raw
    assert mask(server.url, data, format="binary") == raw
    with pytest.raises(MaskingError) as refused:
        mask(server.url, b"not an image at all", format="rgba")
    assert refused.value.status == 400 and "cannot decode the image" in refused.value.message


def test_bad_inputs_get_their_status_and_json_while_valid_requests_in_the_same_batch_succeed(server, held_out):
    jpeg = next(iter(held_out.values()))
    big = encode(Image.fromarray(picture(200, 150, 3)), "PNG")  # 30,000 pixels > MAX_PIXELS
    bad = {  # name: (body, query, content type, status, words in the message)
        "empty body": (b"", "", "image/jpeg", 400, "empty body"),
        "text": (b"hello, world", "", "text/plain", 415, "text/plain is not an image"),
        "text as bytes": (b"hello, world", "", "application/octet-stream", 400, "not a recognised image format"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "", "image/jpeg", 400, "cannot decode the image"),
        "too many pixels": (big, "", "image/png", 413, "above --max-pixels 20000"),
        "too many bytes": (os.urandom(MAX_BYTES + 1), "", "image/jpeg", 413, "above --max-bytes"),
        "bad format": (jpeg, "?format=jpeg", "image/jpeg", 400, "format 'jpeg' is not one of mask, binary, rgba"),
        "bad threshold": (jpeg, "?format=binary&threshold=1.5", "image/jpeg", 400, "threshold '1.5'"),
        "bad refine": (jpeg, "?refine=matting", "image/jpeg", 400, "refine 'matting' is not one of none, guided"),
        "unknown parameter": (jpeg, "?size=10", "image/jpeg", 400, "unknown parameter 'size'"),
    }
    valid = list(held_out.values())[:4]
    expected = [server.post(data)[2] for data in valid]  # alone: batches of one
    before = server.info()["replica"]
    calls = [(b[0], b[1], b[2]) for b in bad.values()] + [(data, "", "image/jpeg") for data in valid]
    start = threading.Barrier(len(calls))

    def send(call):
        start.wait()
        return server.post(*call)

    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(send, calls))
    for (name, (_, _, _, status, words)), (got, kind, body) in zip(bad.items(), answers):
        assert (got, kind) == (status, "application/json"), (name, body[:300])
        assert words in json.loads(body)["error"], (name, body)
    for want, (got, kind, body) in zip(expected, answers[len(bad):]):
        assert (got, kind) == (200, "image/png")
        # batched with each other now: the same masks, within one grey level of batch-size rounding
        assert np.abs(png(body).astype(int) - png(want).astype(int)).max() <= 1
    after = server.info()["replica"]
    assert after["largest_batch"] >= 2  # the valid requests did share a batch
    assert after["masks"] - before["masks"] == len(valid)
    assert after["refused"] - before["refused"] == len(bad)
    assert server.request("GET", "/healthz")[0] == 200


def test_wrong_routes_and_methods_are_json_errors(server):
    assert server.request("GET", "/mask")[:2] == (405, "application/json")
    status, kind, body = server.request("GET", "/nothing-here")
    assert (status, kind) == (404, "application/json") and "POST /mask" in json.loads(body)["error"]


def chromium() -> str:
    found = os.environ.get("BASNET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no Chromium on PATH: `make test` installs it (apt-get install chromium)"
    return found


def test_the_page_shows_the_image_mask_and_cutout_in_headless_chromium(server, held_out, tmp_path):
    from playwright.sync_api import sync_playwright

    name, data = "exif.jpg", held_out["exif.jpg"]
    (tmp_path / name).write_bytes(data)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.goto(server.url)
            page.wait_for_function("document.getElementById('info').textContent.includes('64 px')")
            page.set_input_files("#file", str(tmp_path / name))
            page.wait_for_function("['mask', 'cutout'].every(id => document.getElementById(id).naturalWidth > 0)",
                                   timeout=120_000)
            sizes = page.evaluate("['original', 'mask', 'cutout'].map(id => {const img = "
                                  "document.getElementById(id); return [img.naturalWidth, img.naturalHeight]})")
            downloads = page.evaluate("['mask', 'cutout'].map(id => "
                                      "document.getElementById('download-' + id).download)")
            status = page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert sizes == [[24, 40]] * 3  # 24 wide, 40 high once EXIF-rotated, in all three
    assert downloads == ["exif.mask.png", "exif.cutout.png"]
    confidence = mask_with_quality(server.url, data, refine="guided")[1]["confidence"]
    assert status.startswith("exif.jpg: done") and status.endswith(f"; confidence {confidence:.2f}")
    assert Image.open(tmp_path / "page.png").size[0] == 1200
