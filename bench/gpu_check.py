"""The GPU check: run the ``gpu`` tests, then measure the GPU path and print one table.

    python bench/gpu_check.py               # on a machine with one CUDA GPU; at most 8 minutes on an H100
    python bench/gpu_check.py --skip-tests  # the measurements only

On a machine without CUDA it exits 2 with one line. It needs only PyTorch plus what
``../shared/gpu/wheels.sh`` packs (Ray without its dashboard, kornia, pysodmetrics): Ray is
started without the dashboard where the ``[default]`` extra is missing.

What it measures, in one run:

1. ``pytest -m gpu tests/train/test_gpu.py``: bf16 training killed after epoch 1 and resumed (optimizer
   state on the GPU, loss still falling), two workers sharing one GPU (gloo) ending identical,
   GPU bf16 masks within 1 grey level of fp32 CPU masks.
2. Training images/s at 224 px crops in the default precision (bf16 on GPUs that have it): the Ray
   Train loop (one worker, Ray Data decoding the files) against a plain PyTorch loop on the same
   model and pre-decoded batches (``bench/train_throughput.py``), and the ratio.
3. Bulk masking end to end (read, decode, infer, resize back, encode, write) at 256 px on 2,000
   generated JPEGs: images/s of ``jobs/infer.py``'s pipeline.
4. The model-only ceiling: BASNet's forward alone on batches of 64 at 256 px in bf16, eager and
   ``torch.compile``d, images/s.
5. JPEG decoding of 12 MP photos to the model's 256 px: the GPU's own decoder (nvJPEG through
   ``torchvision.io.decode_jpeg(..., device="cuda")``, batches of 8, then a GPU resize) against the
   job's reduced CPU decode (``basnet.imaging.decode_for_model``) on one core: whether decoding should
   move to the GPU (docs/cluster.md sizes the CPU workers from the CPU figure).
GPU utilisation (mean of ``nvidia-smi`` samples every 0.2 s) and peak GPU memory are given per phase.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402


class GpuSampler:
    """Samples utilisation (%) and memory used (MiB) with nvidia-smi in a thread, for every process."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.samples = interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.wait(self.interval_s):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                util, used = (float(v) for v in out.strip().split(","))
            except (OSError, ValueError, subprocess.SubprocessError):
                continue
            self.samples.append((util, used))

    def __enter__(self) -> "GpuSampler":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "n/a"
        utils = [u for u, _ in self.samples]
        peak = max(m for _, m in self.samples) / 1024
        here = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        return f"{sum(utils) / len(utils):.0f}% util, peak {peak:.1f} GiB used" + (
            f" ({here:.1f} GiB by this process's tensors)" if here else "")


def run_gpu_tests() -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/train/test_gpu.py", "-q", "-s",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    if proc.returncode:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return proc.returncode, summary


def training(args) -> dict:
    import train_throughput

    return train_throughput.measure(args.crop, images=args.train_images, batch_size=args.train_batch,
                                    precision="auto", epochs=2, steps=args.train_images // args.train_batch, warmup=3)


def masking(args, tmp: str) -> dict:
    from basnet.infer.config import InferConfig
    from basnet.infer.ray_pipeline import run_inference
    from basnet.model import BASNet

    import infer_throughput

    torch.manual_seed(0)
    weights = os.path.join(tmp, "basnet.pth")
    torch.save(BASNet().state_dict(), weights)
    start = time.perf_counter()
    infer_throughput.make_images(os.path.join(tmp, "photos"), args.mask_images, args.mask_source_size)
    made = time.perf_counter() - start
    cfg = InferConfig(input=os.path.join(tmp, "photos"), output=os.path.join(tmp, "masks"), weights=weights,
                      image_size=256, batch_size=args.mask_batch, task_batch_size=args.mask_batch)
    start = time.perf_counter()
    summary = run_inference(cfg)
    wall = time.perf_counter() - start
    return {"written": summary.written, "failed": summary.failed, "seconds": summary.seconds, "wall": wall,
            "images_per_s": summary.written / summary.seconds, "generated_s": made}


def model_only(args) -> list[dict]:
    from basnet.device import resolve_precision
    from basnet.model import BASNet
    from basnet.predict import predict_probabilities

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("bf16" if device.type == "cuda" else "fp32", device)
    fmt = torch.channels_last
    base = BASNet().to(device).eval().to(memory_format=fmt)
    images = torch.randint(0, 256, (args.ceiling_batch, args.ceiling_size, args.ceiling_size, 3), dtype=torch.uint8,
                           device=device)
    rows = []
    for compiled in (False, True):
        model = torch.compile(base) if compiled else base
        start = time.perf_counter()
        predict_probabilities(model, images, device=device, precision=precision, memory_format=fmt)
        first = time.perf_counter() - start
        for _ in range(2):  # warm-up (and, compiled, any recompilation)
            predict_probabilities(model, images, device=device, precision=precision, memory_format=fmt)
        start = time.perf_counter()
        for _ in range(args.ceiling_iters):
            predict_probabilities(model, images, device=device, precision=precision, memory_format=fmt)
        seconds = time.perf_counter() - start  # predict_probabilities ends with .cpu(): synchronised
        rows.append({"compiled": compiled, "images_per_s": args.ceiling_iters * args.ceiling_batch / seconds,
                     "first_batch_s": first, "precision": precision.name})
    return rows


def jpeg_decoding(args) -> dict:
    """12 MP JPEGs decoded to 256 px: nvJPEG on the GPU against the reduced CPU decode on one core."""
    import io

    import torch.nn.functional as F
    from PIL import Image

    from basnet.imaging import decode_for_model

    import photos

    height, width = (3024, 4032) if not args.cpu_smoke else (240, 320)
    files = []
    for seed in range(8):
        buffer = io.BytesIO()
        Image.fromarray(photos.photo(height, width, seed)).save(buffer, "JPEG", quality=92)
        files.append(buffer.getvalue())
    start = time.process_time()
    for data in files * 2:
        decode_for_model(data, 256)
    cpu_per_core = 2 * len(files) / (time.process_time() - start)
    out = {"cpu_images_per_s_per_core": cpu_per_core, "gpu_images_per_s": None, "megapixels": height * width / 1e6}
    if not torch.cuda.is_available():
        return out
    from torchvision.io import decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]

    def decode_batch() -> torch.Tensor:
        images = decode_jpeg(tensors, device="cuda")  # one batched nvJPEG call, CHW uint8 on the GPU
        return torch.cat([F.interpolate(img[None].float(), size=(256, 256), mode="bilinear", antialias=True)
                          for img in images])

    decode_batch()  # warm-up: nvJPEG's handles and buffers
    torch.cuda.synchronize()
    rounds = 8
    start = time.perf_counter()
    for _ in range(rounds):
        decode_batch()
    torch.cuda.synchronize()
    out["gpu_images_per_s"] = rounds * len(tensors) / (time.perf_counter() - start)
    return out


def report(results: dict, args, device: str) -> str:
    t, m = results["train"], results["mask"]
    lines = [f"GPU check on {device}, torch {torch.__version__}", "",
             "| what | figure | GPU |", "|---|---|---|",
             f"| gpu tests | {results['tests']} | |",
             f"| training, {args.crop} px crops, batch {args.train_batch}, plain PyTorch loop | "
             f"{t['plain']:.1f} img/s | {results['train_gpu']} |",
             f"| training, same, Ray Train loop (1 worker, last of 2 epochs) | {t['ray']:.1f} img/s "
             f"(epochs: {', '.join(f'{v:.1f}' for v in t['ray_epochs'])}) | |",
             f"| training, Ray loop / plain loop | {t['ratio']:.2f}x | |",
             f"| bulk masking, {m['written']} images at 256 px, end to end | {m['images_per_s']:.1f} img/s "
             f"({m['seconds']:.1f} s in the pipeline, {m['wall']:.1f} s with planning; {m['failed']} failed) | "
             f"{results['mask_gpu']} |"]
    for row in results["ceiling"]:
        kind = "torch.compile" if row["compiled"] else "eager"
        lines.append(f"| model only, batch {args.ceiling_batch} at {args.ceiling_size} px, {row['precision']}, {kind} | "
                     f"{row['images_per_s']:.1f} img/s (first batch {row['first_batch_s']:.1f} s) | "
                     f"{results['ceiling_gpu']} |")
    lines.append(f"| bulk masking / model-only eager ceiling | "
                 f"{m['images_per_s'] / results['ceiling'][0]['images_per_s']:.2f}x | |")
    j = results["jpeg"]
    lines.append(f"| JPEG decode to 256 px, {j['megapixels']:.0f} MP, reduced CPU decode (basnet.imaging), one core | "
                 f"{j['cpu_images_per_s_per_core']:.1f} img/s | |")
    if j["gpu_images_per_s"] is not None:
        lines.append(f"| JPEG decode to 256 px, {j['megapixels']:.0f} MP, nvJPEG (batches of 8) + GPU resize | "
                     f"{j['gpu_images_per_s']:.1f} img/s, as {j['gpu_images_per_s'] / j['cpu_images_per_s_per_core']:.0f}"
                     f" CPU cores | {results['jpeg_gpu']} |")
    lines.append(f"| whole check | {results['seconds']:.0f} s | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="only the measurements")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run this script's own code on a CPU at tiny sizes (to develop it; the figures "
                             "mean nothing)")
    args = parser.parse_args(argv)
    full = not args.cpu_smoke
    args.crop = 224 if full else 32
    args.train_images, args.train_batch = (1024, 32) if full else (8, 4)
    args.mask_images, args.mask_source_size, args.mask_batch = (2000, 320, 64) if full else (16, 48, 8)
    args.ceiling_batch, args.ceiling_size, args.ceiling_iters = (64, 256, 20) if full else (2, 32, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("error: bench/gpu_check.py needs a CUDA GPU, and torch.cuda.is_available() is False here: "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    from basnet.console import setup_logging
    from basnet.ray_init import init_ray

    start = time.perf_counter()
    results: dict = {"tests": "skipped (--cpu-smoke)" if args.cpu_smoke else "skipped (--skip-tests)"}
    status = 0
    if not args.skip_tests and not args.cpu_smoke:
        status, results["tests"] = run_gpu_tests()
    setup_logging()
    init_ray()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run)"
    with GpuSampler() as sampler:
        results["train"] = training(args)
    results["train_gpu"] = sampler.summary()
    with tempfile.TemporaryDirectory() as tmp, GpuSampler() as sampler:
        results["mask"] = masking(args, tmp)
    results["mask_gpu"] = sampler.summary()
    with GpuSampler() as sampler:
        results["ceiling"] = model_only(args)
    results["ceiling_gpu"] = sampler.summary()
    with GpuSampler() as sampler:
        results["jpeg"] = jpeg_decoding(args)
    results["jpeg_gpu"] = sampler.summary()
    results["seconds"] = time.perf_counter() - start
    print(report(results, args, device), flush=True)
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
