"""rembg, run on this project's ONNX export, against this project's own masks: how far apart, and why.

    make rembg                                   # rembg in an environment of its own, .venv-rembg/
    python bench/rembg_compare.py                # random weights, a generated sample's held-out images
    python bench/rembg_compare.py --weights demo_out/runs/demo --images DIR

It exports the weights (``basnet.export``, float32), runs rembg's own command line on the export
(``rembg p -om -m u2net_custom -x '{"model_path": ...}'``, with every proxy variable pointing at a
closed port, so a download would fail), masks the same images with the bulk job at 320 px (rembg's
input side, batches of one), and prints, per image, the mean absolute difference between the two
masks in grey levels, split over the three places where the two pipelines differ:

- normalise:  rembg divides the pixels by the image's own brightest value, this project by 255
              (the same whenever the resized image reaches 255; otherwise rembg brightens it first);
- resize in:  rembg resizes to 320 x 320 with LANCZOS, this project bilinearly (antialiased);
- resize out: rembg truncates the min-max map to 8 bits and resizes that back with LANCZOS; this
              project rounds it to 8 bits and resizes that bilinearly (Pillow's 8-bit path).

The split comes from replaying rembg's steps on the export with ONNX Runtime and swapping them for
this project's one at a time. Two columns close the account (largest difference, grey levels):
``replay``, rembg's masks against the replay of its steps (0: rembg ran the export as it is), and
``job``, the replay with all three swapped against the bulk job's masks (PyTorch against ONNX
Runtime: at most 1).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basnet.device import to_model_input  # noqa: E402
from basnet.imaging import IMAGE_SUFFIXES, decode_image, render_output  # noqa: E402
from basnet.transforms import resize_image  # noqa: E402

REMBG_SIDE = 320
IMAGENET_MEAN, IMAGENET_STD = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, every download fails at once


@dataclass
class Row:
    name: str
    total: float  # mean |rembg - job|, grey levels
    normalise: float
    resize_in: float
    resize_out: float
    replay: int  # max |rembg - replay of rembg's steps|
    job: int  # max |replay with this project's steps - job|
    brightest: int  # the largest value of the image resized for rembg: what rembg divides by


def export(weights: str, path: str) -> str:
    """The weights as ONNX (traced at 64 px; the graph's batch, height and width are dynamic)."""
    from basnet.checkpoint import load_model
    from basnet.export.onnx_model import export_onnx

    export_onnx(load_model(weights), path, image_size=64)
    return path


def run_rembg(rembg: str, model_path: str, images: str, out: str, home: str) -> subprocess.CompletedProcess:
    """rembg's folder command on the export: masks only, no post-processing, no downloads.

    rembg refuses a ``model_path`` outside its home, so ``model_path`` must lie under ``home``."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"U2NET_HOME": home, "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY,
                "https_proxy": DEAD_PROXY, "GRADIO_ANALYTICS_ENABLED": "False"})
    extras = json.dumps({"model_path": model_path})
    return subprocess.run([rembg, "p", "-om", "-m", "u2net_custom", "-x", extras, images, out], env=env,
                          capture_output=True, text=True, timeout=900)


def our_masks(weights: str, images: str, out: str):
    """The bulk job's masks at rembg's side (on the Ray this process is connected to, else a local one)."""
    from basnet.infer.config import InferConfig
    from basnet.infer.ray_pipeline import run_inference

    return run_inference(InferConfig(input=images, output=out, weights=weights, image_size=REMBG_SIDE,
                                     batch_size=1))


def _normalised(pixels: np.ndarray, divisor: float) -> np.ndarray:
    x = (pixels.astype(np.float64) / divisor - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def _minmax(prob: np.ndarray) -> np.ndarray:
    return (prob - prob.min()) / max(float(prob.max() - prob.min()), 1e-8)


def account(model_path: str, images: str, rembg_out: str, job_out: str) -> list[Row]:
    """Per image, the difference between rembg's and the job's masks and where it comes from."""
    from basnet.export.onnx_model import INPUT, ort_session

    session = ort_session(model_path)
    saliency = lambda x: session.run(None, {INPUT: x})[0][0, 0]  # noqa: E731
    rows = []
    for path in sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        image = decode_image(path.read_bytes())
        height, width = image.shape[:2]
        lanczos = np.asarray(Image.fromarray(image).resize((REMBG_SIDE, REMBG_SIDE), Image.Resampling.LANCZOS))
        bilinear = resize_image(image, REMBG_SIDE)

        def rembg_render(prob: np.ndarray) -> np.ndarray:
            eight_bit = Image.fromarray((_minmax(prob) * 255).astype(np.uint8))  # truncated, not rounded
            return np.asarray(eight_bit.resize((width, height), Image.Resampling.LANCZOS), np.int16)

        def job_render(prob: np.ndarray) -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(render_output(_minmax(prob), height, width, fmt="mask"))),
                              np.int16)

        by_255 = rembg_render(saliency(_normalised(lanczos, 255.0)))
        brightest = max(int(lanczos.max()), 1)
        as_rembg = by_255 if brightest == 255 else rembg_render(saliency(_normalised(lanczos, brightest)))
        ours_in = saliency(to_model_input(bilinear[None]).numpy())
        resized_in, resized_out = rembg_render(ours_in), job_render(ours_in)
        theirs = np.asarray(Image.open(Path(rembg_out) / f"{path.stem}.png").convert("L"), np.int16)
        ours = np.asarray(Image.open(Path(job_out) / f"{path.stem}.png"), np.int16)
        mad = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
        rows.append(Row(path.name, mad(theirs, ours), mad(as_rembg, by_255), mad(by_255, resized_in),
                        mad(resized_in, resized_out), int(np.abs(theirs - as_rembg).max()),
                        int(np.abs(resized_out - ours).max()), brightest))
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'image':<22} {'rembg-job':>9} {'normalise':>9} {'resize in':>9} {'resize out':>10} "
          f"{'replay':>6} {'job':>4} {'brightest':>9}")
    for r in rows:
        print(f"{r.name:<22} {r.total:>9.3f} {r.normalise:>9.3f} {r.resize_in:>9.3f} {r.resize_out:>10.3f} "
              f"{r.replay:>6d} {r.job:>4d} {r.brightest:>9d}")
    mean = lambda key: float(np.mean([getattr(r, key) for r in rows]))  # noqa: E731
    print(f"{'mean':<22} {mean('total'):>9.3f} {mean('normalise'):>9.3f} {mean('resize_in'):>9.3f} "
          f"{mean('resize_out'):>10.3f} {max(r.replay for r in rows):>6d} {max(r.job for r in rows):>4d}")
    full = [r for r in rows if r.brightest == 255]
    if full:
        print(f"mean over the {len(full)} image(s) reaching 255 once resized (normalise is then the same): "
              f"{float(np.mean([r.total for r in full])):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint (default: random weights, seed 0)")
    parser.add_argument("--images", help="a folder of images (default: a generated sample's held-out images)")
    parser.add_argument("--sample-size", type=int, nargs=2, default=(64, 80), metavar=("H", "W"),
                        help="the generated sample's nominal size")
    parser.add_argument("--rembg", default=str(REPO / ".venv-rembg" / "bin" / "rembg"))
    args = parser.parse_args()
    if not Path(args.rembg).exists():
        sys.exit(f"error: {args.rembg} not found: run `make rembg` first")
    with tempfile.TemporaryDirectory(prefix="rembg-compare-") as work:
        compare(args, work)


def compare(args: argparse.Namespace, work: str) -> None:
    weights = args.weights
    if not weights:
        import torch

        from basnet.model import BASNet

        torch.manual_seed(0)
        weights = os.path.join(work, "basnet.pth")
        torch.save(BASNet().state_dict(), weights)
    images = args.images
    if not images:
        from basnet.data.sample import generate_sample

        root = generate_sample(os.path.join(work, "sample"), n_train=1, n_test=8, size=tuple(args.sample_size))
        images = os.path.join(root, "DUTS-TE", "DUTS-TE-Image")
    home = os.path.join(work, "rembg-home")
    os.makedirs(home)
    model_path = export(weights, os.path.join(home, "basnet.onnx"))
    proc = run_rembg(args.rembg, model_path, images, os.path.join(work, "rembg"), home)
    if proc.returncode:
        sys.exit(f"error: rembg failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    our_masks(weights, images, os.path.join(work, "job"))
    print_table(account(model_path, images, os.path.join(work, "rembg"), os.path.join(work, "job")))


if __name__ == "__main__":
    main()
