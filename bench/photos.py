"""Camera and phone photos at full size: where a bulk job's CPU goes, and what it costs beside rembg.

    python bench/photos.py                                    # stage table at 1, 12 and 48 MP; cores per GPU
    python bench/photos.py --weights demo_out/runs/demo --all # + reduced-decode sensitivity, job vs plain loop,
                                                              #   a 100 MP photo's memory, rembg (make rembg)

Photos are generated with a seed (a smooth scene, fine texture and sensor noise, one saturated
object with soft and hair-thin edges; JPEG quality 92) into ``--work`` and reused. Sections:

* **stages** (always): CPU milliseconds per image (``time.process_time``, one thread) of each stage as
  the job runs it (``basnet.imaging``: reduced JPEG decode, 8-bit upsampling, PNG level 1) and as a
  plain loop with the same library writes it (Pillow: full decode, float upsampling, default PNG),
  and the cores one GPU at 1,000 images/s needs for the job's CPU stages; the same for an RGBA
  cut-out (PNG and lossless WebP against Pillow's default RGBA PNG).
* **sensitivity** (``--weights``): masks of the reduced decode against the full decode on trained
  weights run at 256 px (the published weights' side), rendered at full size: mean and largest
  difference in grey levels, for drafts that keep twice the side (the job's rule) and the side.
* **job** (``--weights``): ``jobs/infer.py`` on 24 photos of 12 MP against a plain single-process loop
  doing the same work (decode, model, render, encode, write): wall seconds and images/s, cold (start-up
  included) in its own process (``--executor auto`` on this machine) and on a Ray it starts, and for a
  second run on that Ray in the same process (Ray up, weights loaded).
* **memory** (``--weights``): a 100 MP JPEG through ``jobs/infer.py`` with default options: the
  largest process of the job (the model replica included), sampled every 0.1 s.
* **rembg** (``--weights``, ``.venv-rembg``): rembg's folder command and the job on the same photos
  with the same ONNX export at rembg's 320 px (ONNX Runtime in both): wall seconds, start-up
  included, and each side's largest process; the job as run here by default (in its own process)
  and on a Ray it starts.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basnet import storage  # noqa: E402
from basnet.imaging import decode_for_model, encode, render_output, upsample  # noqa: E402

SIDE = 256  # the model's side for the stage table (the published weights' size)
SIZES = {1: (864, 1152), 12: (3024, 4032), 48: (6000, 8000), 100: (8400, 12000)}  # megapixels -> (h, w)
REMBG = REPO / ".venv-rembg" / "bin" / "rembg"
DEAD_PROXY = "http://127.0.0.1:9"


# ---------------------------------------------------------------- photos


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: a smooth scene, texture, noise, one saturated object with soft and thin edges."""
    rng = np.random.default_rng(seed)
    small_h, small_w = max(height // 16, 8), max(width // 16, 8)
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    base = np.stack([110 + 50 * np.sin(xx / small_w * rng.uniform(2, 5) + c) * np.cos(yy / small_h * 3 - c)
                     + rng.normal(0, 18, (small_h, small_w)) for c in (0.0, 1.0, 2.0)], -1)
    scene = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    scale = 4  # the object's mask is drawn at a quarter and smoothed up: soft edges, thin strands
    mask = Image.new("L", (width // scale, height // scale), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0.35, 0.65) * mask.width, rng.uniform(0.35, 0.65) * mask.height
    rx, ry = rng.uniform(0.15, 0.3) * mask.width, rng.uniform(0.15, 0.3) * mask.height
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    for _ in range(12):  # hair-like strands leaving the body
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(1.1, 1.6)
        draw.line([cx, cy, cx + np.cos(angle) * rx * length, cy + np.sin(angle) * ry * length], fill=255,
                  width=max(1, mask.width // 800))
    mask = mask.filter(ImageFilter.GaussianBlur(1.5)).resize((width, height), Image.Resampling.BILINEAR)
    colour = np.array([255, 255, 255]) * np.array(
        [np.abs(np.cos(seed)), np.abs(np.sin(seed * 1.7)), 0.2 + 0.5 * np.abs(np.sin(seed))])
    obj = Image.new("RGB", (width, height), tuple(int(c) for c in colour))
    scene.paste(obj, (0, 0), mask)
    noise = rng.integers(-7, 8, (min(height, 1024), min(width, 1024), 3), dtype=np.int16)
    pixels = np.asarray(scene, np.int16)
    for top in range(0, height, noise.shape[0]):  # tile the sensor noise, block by block
        rows = pixels[top:top + noise.shape[0]]
        reps = -(-width // noise.shape[1])
        rows += np.tile(noise[:rows.shape[0]], (1, reps, 1))[:, :width]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def photos(work: str, megapixels: int, count: int) -> list[str]:
    """``count`` JPEGs of about ``megapixels`` MP under ``work`` (generated once, then reused)."""
    height, width = SIZES[megapixels]
    folder = os.path.join(work, f"{megapixels}mp")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"IMG_{i:04d}.jpg")
        if not os.path.exists(path):
            Image.fromarray(photo(height, width, 1000 * megapixels + i)).save(path, "JPEG", quality=92)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- stages


def cpu_ms(fn, repeat: int = 3):
    """The least CPU time of ``repeat`` calls (ms) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        out = fn()
        best = min(best, (time.process_time() - start) * 1000)
    return best, out


def smooth_map(seed: int = 0) -> np.ndarray:
    """A model-like map: a soft blob, min-max normalised."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    rng = np.random.default_rng(seed)
    blob = ((xx - SIDE * rng.uniform(0.4, 0.6)) ** 2 + (yy - SIDE * rng.uniform(0.4, 0.6)) ** 2 * 1.3) / (SIDE / 3) ** 2
    prob = 1 / (1 + np.exp(-(1 - blob) * 8))
    return ((prob - prob.min()) / (prob.max() - prob.min())).astype(np.float32)


def plain_decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)


def plain_render(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    full = np.asarray(Image.fromarray(prob, "F").resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(np.rint(full * 255), 0, 255).astype(np.uint8)


def plain_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def stage_rows(paths: list[str], out_dir: str) -> tuple[dict, dict]:
    """Mean CPU ms per stage for the job's code and the plain loop over ``paths``."""
    job = dict.fromkeys(("read", "decode", "render", "encode", "write"), 0.0)
    plain = dict(job)
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        job["read"] += cpu_ms(lambda: storage.read_bytes(path))[0]  # through pyarrow, as the job reads
        plain["read"] += cpu_ms(lambda: Path(path).read_bytes())[0]
        ms, decoded = cpu_ms(lambda: decode_for_model(data, SIDE))
        job["decode"] += ms
        plain["decode"] += cpu_ms(lambda: plain_decode(data))[0]
        prob = smooth_map()
        ms, grey = cpu_ms(lambda: upsample(prob, decoded.height, decoded.width))
        job["render"] += ms
        ms, float_grey = cpu_ms(lambda: plain_render(prob, decoded.height, decoded.width))
        plain["render"] += ms
        ms, png = cpu_ms(lambda: encode(grey, "png"))
        job["encode"] += ms
        ms, default_png = cpu_ms(lambda: plain_png(float_grey))
        plain["encode"] += ms
        target = os.path.join(out_dir, "mask.png")
        job["write"] += cpu_ms(lambda: storage.write_bytes(target, png))[0]  # atomic: temporary name, rename
        plain["write"] += cpu_ms(lambda: Path(target).write_bytes(default_png))[0]
    return {k: v / len(paths) for k, v in job.items()}, {k: v / len(paths) for k, v in plain.items()}


def cutout_row(path: str) -> dict:
    data = Path(path).read_bytes()
    decoded = decode_for_model(data, SIDE)
    prob = smooth_map()
    row = {}
    for name, fn in (("plain", lambda: plain_png(np.dstack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                                                             plain_render(prob, decoded.height, decoded.width)]))),
                     ("png", lambda: render_output(prob, decoded.height, decoded.width, fmt="rgba", source=data)),
                     ("webp", lambda: render_output(prob, decoded.height, decoded.width, fmt="rgba", source=data,
                                                    encoding="webp"))):
        ms, out = cpu_ms(fn, repeat=1)
        row[name] = (ms, len(out))
    return row


def stage_table(work: str, sizes: list[int]) -> None:
    counts = {1: 8, 12: 4, 48: 2, 100: 1}
    print(f"\nCPU ms per image, one thread (job: basnet.imaging; plain: Pillow full decode, float upsample, "
          f"default PNG), model side {SIDE}")
    print("| MP | stage | read | decode | render | encode | write | total | cores per GPU at 1,000 img/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as out_dir:
        for mp in sizes:
            job, plain = stage_rows(photos(work, mp, counts[mp]), out_dir)
            for name, row in (("job", job), ("plain", plain)):
                total = sum(row.values())
                print(f"| {mp} | {name} | " + " | ".join(f"{row[k]:.1f}" for k in row) +
                      f" | {total:.1f} | {total:.0f} |")
            ratios = {k: job[k] / max(plain[k], 1e-9) for k in ("decode", "render", "encode")}
            print(f"|  | job / plain | | {ratios['decode']:.2f}x | {ratios['render']:.2f}x | {ratios['encode']:.2f}x "
                  f"| | {sum(job.values()) / sum(plain.values()):.2f}x | |")
    row = cutout_row(photos(work, 12, 1)[0])
    print("\nRGBA cut-out of one 12 MP photo (render + encode, CPU ms, file MB): "
          + ", ".join(f"{k} {ms:.0f} ms {size / 1e6:.1f} MB ({ms / row['plain'][0]:.2f}x plain)"
                      for k, (ms, size) in row.items()))


# ---------------------------------------------------------------- the model


def predictor(weights: str, side: int | None = None):
    import torch

    from basnet.checkpoint import load_for_inference
    from basnet.infer.predictor import MaskPredictor

    model, size = load_for_inference(weights, side)
    torch.set_num_threads(os.cpu_count() or 1)
    return MaskPredictor(model.state_dict(), device=torch.device("cpu"), image_size=size), size


def sensitivity(work: str, weights: str) -> None:
    """Masks from reduced decoding against the full decode, on trained weights, at full size."""
    model, size = predictor(weights, SIDE)  # the deployed side: at a small training side every draft is 1/8
    print(f"\nreduced against full decoding, masks at full size on {weights} at {size} px: grey levels")
    print("| MP | images | draft keeps | mean difference | largest | share of pixels differing |")
    print("|---:|---:|---|---:|---:|---:|")
    from basnet.imaging import decode as decode_module

    for mp, count in ((12, 8), (48, 2)):
        for factor in (2, 1):
            decode_module.REDUCED_DECODE_FACTOR = factor
            means, largest, shares = [], 0, []
            for path in photos(work, mp, count):
                data = Path(path).read_bytes()
                masks = []
                for reduced in (True, False):
                    d = decode_for_model(data, size, reduced=reduced)
                    prob = model.predict(d.image[None])[0]
                    masks.append(np.asarray(upsample(prob, d.height, d.width), np.int16))
                diff = np.abs(masks[0] - masks[1])
                means.append(float(diff.mean()))
                largest = max(largest, int(diff.max()))
                shares.append(float((diff > 0).mean()))
            print(f"| {mp} | {count} | {factor}x the side | {np.mean(means):.3f} | {largest} | {np.mean(shares):.3f} |")
    decode_module.REDUCED_DECODE_FACTOR = 2


# ---------------------------------------------------------------- whole jobs


class PeakMemory:
    """The largest resident set of any process of a tree, sampled every 0.1 s while it runs."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root, self.peak, self.name = psutil.Process(pid), 0, ""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self.done.wait(0.1):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    if rss > self.peak:
                        self.peak, self.name = rss, " ".join(proc.cmdline()[:2])[-60:] or proc.name()
                except psutil.Error:
                    pass

    def stop(self) -> tuple[float, str]:
        self.done.set()
        self.thread.join()
        return self.peak / 1e9, self.name


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, str, subprocess.CompletedProcess]:
    """Wall seconds, the largest process's GB and name, and the finished process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    memory = PeakMemory(proc.pid)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    peak, name = memory.stop()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err[-2000:]}")
    return seconds, peak, name, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def infer_cmd(images: str, out: str, weights: str, *extra: str) -> list[str]:
    return [sys.executable, "jobs/infer.py", "--input", images, "--output", out, "--weights", weights, *extra]


def plain_loop(paths: list[str], weights: str, out: str) -> float:
    """One process: read, full decode, the model, float render, default PNG, write; wall seconds."""
    model, size = predictor(weights)
    start = time.perf_counter()
    for path in paths:
        data = Path(path).read_bytes()
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        prob = model.predict(pixels[None])[0]
        Path(out, Path(path).stem + ".png").write_bytes(plain_png(plain_render(prob, height, width)))
    return time.perf_counter() - start


WARM_RUN = """
import sys, time
from basnet.infer.config import InferConfig
from basnet.infer.ray_pipeline import run_inference
images, out, weights = sys.argv[1:4]
run_inference(InferConfig(input=images, output=out, weights=weights))  # starts Ray, loads the weights
start = time.perf_counter()
summary = run_inference(InferConfig(input=images, output=out, weights=weights, overwrite=True))
print(f"{time.perf_counter() - start:.2f} {summary.written}")
"""


def job_against_plain(work: str, weights: str, count: int = 24) -> None:
    paths = photos(work, 12, count)
    with tempfile.TemporaryDirectory() as out:
        plain_s = plain_loop(paths, weights, out)
    with tempfile.TemporaryDirectory() as images:
        for p in paths:  # exactly these photos (the folder may hold more from other sections)
            os.symlink(p, os.path.join(images, os.path.basename(p)))
        with tempfile.TemporaryDirectory() as out:
            job_s, peak, name, _ = timed(infer_cmd(images, out, weights))  # --executor auto: in its own process
        with tempfile.TemporaryDirectory() as out:
            ray_s, ray_peak, ray_name, _ = timed(infer_cmd(images, out, weights, "--executor", "ray"))
        with tempfile.TemporaryDirectory() as out:
            _, _, _, proc = timed([sys.executable, "-c", WARM_RUN, images, out, weights])
            warm_s = float(proc.stdout.split()[-2])
    print(f"\n{count} photos of 12 MP, {weights}: plain loop {plain_s:.1f} s after its model is loaded "
          f"({count / plain_s:.2f} img/s); jobs/infer.py cold, start-up included: in its own process (--executor "
          f"auto) {job_s:.1f} s ({count / job_s:.2f} img/s, {plain_s / job_s:.2f}x the plain loop), largest process "
          f"{peak:.2f} GB ({name}); on a Ray it starts (--executor ray) {ray_s:.1f} s ({plain_s / ray_s:.2f}x), "
          f"largest process {ray_peak:.2f} GB ({ray_name}); a second run on that Ray in the same process (Ray up, "
          f"weights loaded) {warm_s:.1f} s ({count / warm_s:.2f} img/s, {plain_s / warm_s:.2f}x the plain loop)")


def memory_100mp(work: str, weights: str) -> None:
    path = photos(work, 100, 1)[0]
    with tempfile.TemporaryDirectory() as out:
        seconds, peak, name, proc = timed(infer_cmd(path, out, weights))
        written = "written 1" in proc.stdout
    print(f"\na 100 MP JPEG (12000 x 8400) under default options: {'masked' if written else 'NOT masked'} "
          f"in {seconds:.1f} s, largest process {peak:.2f} GB ({name})")


def export_onnx(weights: str, path: str) -> str:
    if not os.path.exists(path):
        subprocess.run([sys.executable, "jobs/export.py", "--weights", weights, "--out", path], check=True,
                       cwd=REPO, capture_output=True)
    return path


def rembg_against_job(work: str, weights: str, counts: list[int]) -> None:
    if not REMBG.exists():
        print(f"\nrembg: {REMBG} is missing (make rembg)")
        return
    home = os.path.join(work, "u2net_home")
    os.makedirs(home, exist_ok=True)
    model = export_onnx(weights, os.path.join(home, "basnet.onnx"))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"U2NET_HOME": home, "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY,
                "GRADIO_ANALYTICS_ENABLED": "False"})
    print("\nrembg 2.0.86's folder command against jobs/infer.py: the same photos, the same ONNX export at 320 px, "
          "ONNX Runtime in both (wall seconds with start-up; largest process GB). The job as a user runs it on this "
          "machine (--executor auto: in its own process), and on a Ray it starts (--executor ray)")
    print("| photos | rembg s | rembg GB | job s | job GB | job / rembg time | job on Ray s | job on Ray GB | "
          "on Ray / rembg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mp, count in [(12, n) for n in counts] + [(48, 1), (100, 1)]:
        paths = photos(work, mp, count)
        with tempfile.TemporaryDirectory() as folder:
            for p in paths:
                os.symlink(p, os.path.join(folder, os.path.basename(p)))
            r_s, r_gb = rembg_run(folder, model, env)
            jobs = []
            for executor in ("auto", "ray"):
                with tempfile.TemporaryDirectory() as out_j, tempfile.TemporaryDirectory() as ort_cache:
                    # A first run on this machine: no optimised graph kept from an earlier one (basnet/export/ort.py).
                    j_s, j_gb, _, proc = timed(infer_cmd(folder, out_j, model, "--image-size", "320", "--executor",
                                                         executor), env={**os.environ, "BASNET_ORT_CACHE": ort_cache})
                    if f"written {count}," not in proc.stdout:
                        raise SystemExit(f"the job (--executor {executor}) did not mask the {count} photos: "
                                         f"{proc.stderr[-2000:]}")
                    jobs.append((j_s, j_gb))
        (a_s, a_gb), (y_s, y_gb) = jobs
        print(f"| {count} x {mp} MP | {r_s:.1f} | {r_gb:.2f} | {a_s:.1f} | {a_gb:.2f} | {a_s / r_s:.2f}x | "
              f"{y_s:.1f} | {y_gb:.2f} | {y_s / r_s:.2f}x |")


def rembg_run(folder: str, model: str, env: dict) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out_r:
        r_s, r_gb, _, _ = timed([str(REMBG), "p", "-om", "-m", "u2net_custom", "-x",
                                 f'{{"model_path": "{model}"}}', folder, out_r], env=env)
    return r_s, r_gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "basnet-photos"),
                        help="where the generated photos are kept between runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 12, 48], help="megapixels: 1, 12, 48 or 100")
    parser.add_argument("--weights", help="a trained checkpoint (make demo: demo_out/runs/demo/epoch_0003)")
    parser.add_argument("--all", action="store_true", help="with --weights: every section")
    parser.add_argument("--rembg-photos", type=int, nargs="+", default=[4, 16],
                        help="rembg section: how many 12 MP photos per row (then 1 x 48 MP and 1 x 100 MP)")
    parser.add_argument("--sections", nargs="+", default=None,
                        choices=["stages", "sensitivity", "job", "memory", "rembg"])
    args = parser.parse_args()
    sections = args.sections or (["stages", "sensitivity", "job", "memory", "rembg"] if args.all else ["stages"])
    if set(sections) - {"stages"} and not args.weights:
        parser.error("--weights is needed for every section but stages")
    if "stages" in sections:
        stage_table(args.work, args.sizes)
    if "sensitivity" in sections:
        sensitivity(args.work, args.weights)
    if "job" in sections:
        job_against_plain(args.work, args.weights)
    if "memory" in sections:
        memory_100mp(args.work, args.weights)
    if "rembg" in sections:
        rembg_against_job(args.work, args.weights, args.rembg_photos)


if __name__ == "__main__":
    main()
