"""Throughput and memory of the bulk-masking job against a plain single-process loop.

    python bench/infer_throughput.py --n 400 --size 64 --image-size 64 --scale 0
    python bench/infer_throughput.py --n 24 --size 256 --image-size 256 --scale 0
    python bench/infer_throughput.py --n 200 --size 256 --image-size 256 --batch-size 32   # on a GPU
    python bench/infer_throughput.py --n 400 --size 64 --image-size 64 --scale 0 --runtime onnxruntime --onnx-file

On the same N generated JPEGs it times (1) a plain loop that, one image after another, decodes
with PIL, runs the model, resizes the map back and writes the PNG, and (2) the Ray Data job
(``basnet.infer.ray_pipeline.run_inference``) on a local Ray, twice: on the freshly started Ray (cold:
every worker process starts and imports torch) and again (warm: Ray's idle workers are reused;
the model actor still starts anew, as in every run). Both are timed from loading the weights to
the last PNG written. For each job run it prints the startup (seconds from the call to the first
mask on disk, less the model time of that mask's batch) and the per-stage seconds summed over the
images (stages overlap, so the largest bounds the run). With ``--scale`` above 0 it then runs the
job on scale x N images and reports the peak memory of the
whole Ray process tree (this driver and every process below it: GCS, raylet, workers) for the
warm N run and the 10 x N run.
Memory is the sum of PSS (proportional set size: shared pages such as torch's libraries and the
object store counted once in total, not once per process) and, for reference, the sum of RSS.
Weights are random: throughput does not depend on them. ``--runtime onnxruntime`` has each job
export them to ONNX in its weights task; with ``--onnx-file`` they are exported beforehand (untimed,
as ``jobs/export.py`` would) and the jobs get the ``.onnx`` as ``--weights``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet import storage  # noqa: E402
from basnet.checkpoint import load_model  # noqa: E402
from basnet.device import resolve_precision  # noqa: E402
from basnet.imaging import decode_image, encode_png, to_grey  # noqa: E402
from basnet.infer.config import RUNTIMES, InferConfig  # noqa: E402
from basnet.model import BASNet  # noqa: E402
from basnet.predict import predict_probabilities  # noqa: E402
from basnet.transforms import resize_image, resize_mask  # noqa: E402


def make_images(root: str, n: int, size: int) -> list[str]:
    """N photo-like JPEGs (gradient, noise, a bright ellipse) in 10 sub-folders."""
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        base = rng.uniform(40, 120, 3) + yy[..., None] * rng.uniform(-40, 40, 3)
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        pixels = np.where(inside, rng.uniform(160, 255, 3), base) + rng.normal(0, 6, (size, size, 3))
        path = os.path.join(root, f"d{i % 10}", f"img{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(paths: list[str], out: str, weights: str, image_size: int) -> float:
    """The baseline: one process, one image at a time. Returns seconds."""
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(weights, map_location=device)
    precision = resolve_precision("auto", device)
    for path in paths:
        image = decode_image(storage.read_bytes(path))
        batch = torch.from_numpy(resize_image(image, image_size)[None])
        prob = predict_probabilities(model, batch, device=device, precision=precision)[0].numpy()
        mask = to_grey(resize_mask(prob, image.shape[:2]))
        folder, name = os.path.split(path)
        target = os.path.join(out, os.path.basename(folder), os.path.splitext(name)[0] + ".png")
        storage.write_bytes(target, encode_png(mask))
    return time.perf_counter() - start


class TreeMemory:
    """Samples the summed PSS and RSS of this process and all its descendants in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak_pss, self.peak_rss, self.peak_procs = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int, int]:
        """Summed PSS and RSS, and the number of processes in the tree."""
        me = psutil.Process()
        tree = [me, *me.children(recursive=True)]
        pss = rss = 0
        for proc in tree:
            try:
                info = proc.memory_full_info()
                pss, rss = pss + getattr(info, "pss", info.rss), rss + info.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return pss, rss, len(tree)

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, rss, procs = self.sample()
            if pss > self.peak_pss:
                self.peak_pss, self.peak_procs = pss, procs
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class FirstMask:
    """Seconds from start to the first PNG under a folder, polled in a thread."""

    def __init__(self, folder: str) -> None:
        self.folder, self.seconds = folder, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.seconds is None:
            for _, _, files in os.walk(self.folder):
                if any(f.endswith(".png") for f in files):
                    self.seconds = time.perf_counter() - self.start
                    break
            self._stop.wait(0.02)  # polling a folder: a file appearing has no event to await

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def job(input_dir: str, out: str, weights: str, args: argparse.Namespace):
    from basnet.infer.ray_pipeline import run_inference

    cfg = InferConfig(input=input_dir, output=out, weights=weights, image_size=args.image_size,
                      batch_size=args.batch_size, actors=args.actors, actor_threads=args.actor_threads,
                      runtime=args.runtime)
    with TreeMemory() as memory:
        first = FirstMask(out)
        start = time.perf_counter()
        summary = run_inference(cfg)
        seconds = time.perf_counter() - start
        first.stop()
    assert summary.written == summary.total, summary.line()
    from basnet.infer.config import cpu_batch_size

    batch = args.batch_size or (8 if torch.cuda.is_available() else cpu_batch_size(args.image_size))
    batch_s = summary.stage_seconds.get("infer_s", 0.0) / max(summary.written, 1) * min(batch, summary.written)
    startup = (first.seconds or seconds) - batch_s
    return seconds, memory, startup, summary.stages_line()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="images in the timed comparison")
    parser.add_argument("--size", type=int, default=64, help="side of the generated images, px")
    parser.add_argument("--image-size", type=int, default=64, help="model input side, a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=None, help="the job's batch size (default: the job's)")
    parser.add_argument("--actors", type=int, default=None, help="the job's model replicas (default: auto)")
    parser.add_argument("--actor-threads", type=int, default=None, help="the job's torch threads (default: auto)")
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES,
                        help="the job's --runtime (the plain loop is PyTorch either way)")
    parser.add_argument("--onnx-file", action="store_true",
                        help="with --runtime onnxruntime: give the jobs an exported .onnx as --weights (no export "
                             "in the job)")
    parser.add_argument("--scale", type=int, default=10, help="the memory run uses scale x N images (0: none)")
    parser.add_argument("--workdir", default=None, help="where images and masks go (default: a temp dir)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="basnet-bench-")
    torch.manual_seed(0)
    weights = os.path.join(work, "basnet.pth")
    torch.save(BASNet().state_dict(), weights)
    job_weights = weights
    if args.onnx_file:
        if args.runtime != "onnxruntime":
            raise SystemExit("--onnx-file is for --runtime onnxruntime")
        from basnet.export.onnx_model import export_onnx

        job_weights = os.path.join(work, "basnet.onnx")
        export_onnx(load_model(weights), job_weights, image_size=args.image_size)
    small = make_images(os.path.join(work, "n"), args.n, args.size)
    if args.scale:
        make_images(os.path.join(work, "n10"), args.n * args.scale, args.size)

    loads = []  # the 1-minute load average after each phase: other processes skew every figure
    loop_s = plain_loop(small, os.path.join(work, "loop"), weights, args.image_size)
    loads.append(os.getloadavg()[0])
    from basnet.ray_init import init_ray

    init_ray()
    idle_pss, idle_rss, idle_procs = TreeMemory().sample()
    cold_s, _, cold_start, cold_stages = job(os.path.join(work, "n"), os.path.join(work, "job-cold"), job_weights, args)
    loads.append(os.getloadavg()[0])
    job_s, mem_n, warm_start, warm_stages = job(os.path.join(work, "n"), os.path.join(work, "job-n"), job_weights,
                                                args)
    loads.append(os.getloadavg()[0])
    print(f"\nstartup (to the first mask, less its batch's model time): cold {cold_start:.1f} s, warm {warm_start:.1f} s")
    print(f"cold {cold_stages}\nwarm {warm_stages}")
    if not args.scale:
        report_speed(args, (loop_s, cold_s, job_s), loads)
        return
    job10_s, mem_10, _, _ = job(os.path.join(work, "n10"), os.path.join(work, "job-n10"), job_weights, args)
    loads.append(os.getloadavg()[0])
    report(args, (loop_s, cold_s, job_s, job10_s), loads, (idle_pss, idle_rss, idle_procs), mem_n, mem_10)


def report_speed(args: argparse.Namespace, seconds: tuple[float, float, float], loads: list[float]) -> None:
    (loop_s, cold_s, job_s), n = seconds, args.n
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x {os.cpu_count()}"
    print(f"\n{n} images of {args.size} px, model at {args.image_size} px, batch {args.batch_size or 'auto'}, "
          f"job runtime {args.runtime}{' (weights: an exported .onnx)' if args.onnx_file else ''}, "
          f"{device}")
    print(f"plain loop          : {loop_s:7.1f} s  {n / loop_s:7.2f} images/s              load {loads[0]:.1f}")
    print(f"job, cold Ray       : {cold_s:7.1f} s  {n / cold_s:7.2f} images/s  ratio {loop_s / cold_s:.2f}x  "
          f"load {loads[1]:.1f}")
    print(f"job, warm Ray       : {job_s:7.1f} s  {n / job_s:7.2f} images/s  ratio {loop_s / job_s:.2f}x  "
          f"load {loads[2]:.1f}")


def report(args: argparse.Namespace, seconds: tuple[float, float, float, float], loads: list[float],
           idle: tuple[int, int, int], mem_n: TreeMemory, mem_10: TreeMemory) -> None:
    (loop_s, cold_s, job_s, job10_s), n10, gib = seconds, args.n * args.scale, 2.0 ** 30
    report_speed(args, (loop_s, cold_s, job_s), loads)
    print(f"job, {n10:5d} images : {job10_s:7.1f} s  {n10 / job10_s:7.2f} images/s              load {loads[3]:.1f}")
    print(f"memory (PSS sum): idle Ray {idle[0] / gib:.2f} GiB, peak N {mem_n.peak_pss / gib:.2f} GiB, "
          f"peak {args.scale}xN {mem_10.peak_pss / gib:.2f} GiB, ratio {mem_10.peak_pss / mem_n.peak_pss:.2f}")
    print(f"memory (RSS sum): idle Ray {idle[1] / gib:.2f} GiB, peak N {mem_n.peak_rss / gib:.2f} GiB, "
          f"peak {args.scale}xN {mem_10.peak_rss / gib:.2f} GiB, ratio {mem_10.peak_rss / mem_n.peak_rss:.2f}")
    print(f"processes in the tree: idle {idle[2]}, at the PSS peak N {mem_n.peak_procs}, "
          f"{args.scale}xN {mem_10.peak_procs}")


if __name__ == "__main__":
    main()
