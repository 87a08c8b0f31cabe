"""How well mask confidence ranks the errors, and what it costs beside the model stage.

    python bench/confidence.py --weights runs/long/epoch_0024                 # held-out contrast 0.25-1
    python bench/confidence.py --weights runs/long/epoch_0024 --contrast 0 1  # down to invisible objects

1. Held-out data with ground truth: the embedded sample's held-out images plus ``--count`` more
   generated the same way (one in eight without an object) with each object's contrast drawn from
   ``--contrast``. ``jobs/evaluate.py --weights`` masks and scores them, once per ``--normalize``,
   and prints its confidence line; beside it, the same two figures for the raw map's largest value
   alone (the plain baseline), from the evaluation's per_image.parquet.
2. The candidates the formula was chosen from: the model run directly on the same images (at the
   checkpoint's side, the 7 side outputs kept), each candidate ranked against the per-image MAE of
   the mask as written under each ``--normalize`` (at that side, against the soft ground truth
   resized to it, not binarised: close to, not equal to, the job's ``mae_as_written``).
3. The cost: the model's forward pass on a batch against ``basnet.quality.finish`` on its maps, one
   map at a time as the write stage judges them, at the checkpoint's side and at 256 px (the
   published weights'), on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from basnet.checkpoint import load_for_inference  # noqa: E402
from basnet.data.sample import ensure_sample, generate_sample  # noqa: E402
from basnet.predict import predict_raw  # noqa: E402
from basnet.quality import finish, least_confident_ratio, spearman  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out(root: str, count: int, contrast: tuple[float, float], seed: int) -> str:
    """A DUTS-layout root whose DUTS-TE holds the sample's held-out pairs and ``count`` generated ones."""
    images, masks = os.path.join(root, "DUTS-TE", "DUTS-TE-Image"), os.path.join(root, "DUTS-TE", "DUTS-TE-Mask")
    os.makedirs(images)
    os.makedirs(masks)
    extra = generate_sample(os.path.join(root, "generated"), n_train=1, n_test=count, seed=seed, contrast=contrast)
    for source, prefix in ((ensure_sample(), "sample_"), (extra, "more_")):
        for kind, target in (("Image", images), ("Mask", masks)):
            folder = os.path.join(source, "DUTS-TE", f"DUTS-TE-{kind}")
            for name in sorted(os.listdir(folder)):
                shutil.copyfile(os.path.join(folder, name), os.path.join(target, prefix + name))
    return root


def rank_figures(weights: str, data: str, out: str, normalize: str) -> None:
    cmd = [sys.executable, os.path.join(REPO, "jobs", "evaluate.py"), "--weights", weights, "--data", data,
           "--out", out, "--normalize", normalize]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"jobs/evaluate.py failed: {proc.stderr[-2000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("confidence against"))
    table = pd.read_parquet(os.path.join(out, "per_image.parquet"))
    with open(os.path.join(out, "metrics.json")) as f:
        doc = json.load(f)
    written = table["mae_as_written"]  # what the confidence ranks: the masks as written, not stretched
    print(f"--normalize {normalize}: protocol MAE {doc['metrics']['mae']:.4f}, maxF {doc['metrics']['max_f']:.3f}; "
          f"MAE of the masks as written {written.mean():.4f}")
    print(f"  {line}")
    print(f"  baseline, the raw map's largest value alone: Spearman {spearman(table['peak'], written):+.3f}, "
          f"least confident tenth's MAE {least_confident_ratio(table['peak'], written):.2f}x the rest's")
    missed = table[~table["gt_empty"] & (table["peak"] < 0.1)]
    print(f"  objects the model answered like an empty scene (largest value under 0.1): {len(missed)} of "
          f"{int((~table['gt_empty']).sum())}, mean MAE as written "
          f"{missed['mae_as_written'].mean() if len(missed) else 0:.3f}")


def candidates(weights: str, data: str) -> None:
    from PIL import Image

    from basnet.device import to_model_input
    from basnet.imaging import decode_for_model

    model, size = load_for_inference(weights, None)
    folder = os.path.join(data, "DUTS-TE", "DUTS-TE-Image")
    rows, truths = [], []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            image = decode_for_model(f.read(), size).image
        mask = Image.open(os.path.join(data, "DUTS-TE", "DUTS-TE-Mask", name.rsplit(".", 1)[0] + ".png"))
        truths.append(np.asarray(mask.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255)
        with torch.no_grad():
            outputs = model(to_model_input(torch.from_numpy(image[None])))
        rows.append([torch.sigmoid(m.float())[0, 0].numpy() for m in outputs])
    for normalize in ("minmax", "none"):
        figures: dict[str, list[float]] = {}
        errors = []
        for maps, truth in zip(rows, truths):
            p, sides = maps[0], np.stack(maps[1:])
            written, judged = finish(p, normalize=normalize)  # the mask's map and its figures, as the job
            errors.append(float(np.abs(written - truth).mean()))
            decision, raw_expected = abs(2 * p.max() - 1), float((2 * p * (1 - p)).mean())
            soft_iou = np.minimum(p, sides).sum(axis=(1, 2)) / np.maximum(np.maximum(p, sides).sum(axis=(1, 2)), 1e-9)
            row = {"peak alone (baseline)": p.max(), "|2 peak - 1|": decision,
                   "|2 peak - 1| x (1 - raw map's 2p(1-p))": decision * (1 - raw_expected),
                   "|2 peak - 1| x soft IoU with the side outputs": decision * float(soft_iou.mean()),
                   "2^(-written mask's expected error / 0.1) (chosen)": judged["confidence"],
                   "the chosen x |2 peak - 1|": judged["confidence"] * decision}
            for key, value in row.items():
                figures.setdefault(key, []).append(float(value))
        print(f"candidates against the per-image MAE of the mask written with --normalize {normalize} "
              f"(at {size} px, {len(errors)} images):")
        for key, values in figures.items():
            print(f"  {key:52s} Spearman {spearman(values, errors):+.3f}, least confident tenth "
                  f"{least_confident_ratio(values, errors):.2f}x")


def overhead(weights: str, sides: list[int], batch: int, repeats: int) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    for side in sides:
        model, _ = load_for_inference(weights, side)
        images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8))
        predict_raw(model, images, device=torch.device("cpu"))  # warm up
        forward, judge = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            raw = predict_raw(model, images, device=torch.device("cpu")).numpy()
            forward.append(time.perf_counter() - start)
            start = time.perf_counter()
            for one in raw:  # as the write stage does: each map finished and judged beside its mask's rendering
                finish(one)
            judge.append(time.perf_counter() - start)
        f, j = np.median(forward), np.median(judge)
        print(f"{side} px, batch {batch}: model {1000 * f / batch:.1f} ms/image, quality figures "
              f"{1000 * j / batch:.3f} ms/image (one core, in the write stage): {100 * j / f:.2f} % of the "
              f"model stage's time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a checkpoint trained on the sample")
    parser.add_argument("--count", type=int, default=240, help="generated held-out images besides the sample's")
    parser.add_argument("--contrast", type=float, nargs=2, default=(0.25, 1.0), help="objects' contrast range")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--normalize", nargs="+", default=["none", "minmax"])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = held_out(os.path.join(work, "data"), args.count, tuple(args.contrast), args.seed)
        print(f"held-out data: the sample's held-out images and {args.count} more, contrast "
              f"{args.contrast[0]:g}-{args.contrast[1]:g}, one in eight without an object")
        for normalize in args.normalize:
            rank_figures(args.weights, data, os.path.join(work, f"eval-{normalize}"), normalize)
        candidates(args.weights, data)
    overhead(args.weights, args.sides, args.batch, args.repeats)


if __name__ == "__main__":
    main()
