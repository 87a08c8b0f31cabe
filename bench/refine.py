"""Edges and cut-outs at full size: guided upsampling against plain bilinear, estimated foreground
colours against the photo's own, on composites whose true alpha is known.

    python bench/refine.py                                   # upsampling alone, colours, cost at 2 and 12 MP
    python bench/refine.py --weights demo_out/runs/demo/epoch_0003  # + end to end from a checkpoint
    python bench/refine.py --picture docs/refine_edge.png    # + the README's side-by-side edge crop

Composites (made here with a seed): a textured object with a boundary that is sharp in places and
tens of pixels soft in others, with hair-like strands of 1-3 px and partial alpha leaving it, over a
textured colour background, at about 2 MP (1224 x 1632) and 12 MP (3024 x 4032). Sections:

* **upsampling** (always): the true alpha shrunk to the model's 256 px (area average) stands in for
  a perfect model; its map is taken back to full size plainly (``basnet.imaging.upsample``) and
  refined (``basnet.imaging.refine.refine_mask``). Alpha measures of alphamatting.com on alpha in
  [0, 1]: SAD (sum of absolute differences / 1000), MSE, gradient error (Gaussian derivatives,
  sigma 1.4; sum of squared differences of the gradient magnitudes / 1000), and refined / plain.
* **colours**: each composite cut out and laid on a new background (pure green): the mean colour
  error in grey levels, over the pixels of partial true alpha, of the naive cut-out (the photo's own
  colours) and of estimated foreground colours (``estimate_foreground``), with the true alpha and
  with the refined one.
* **cost**: milliseconds per image (wall, best of 3, OpenCV's threads on this machine's cores) of the
  refinement (guide shrink, filter fit, band apply) and of the foreground estimate.
* **end to end** (``--weights``, a checkpoint trained on the sample): scenes of the sample's own
  kind (``basnet.data.sample.make_example``: a saturated object with 1-2 px antennae and rings over a
  muted textured background, its soft mask the true alpha) at 2 MP, written as a JPEG (quality 92),
  decoded for the model as the bulk job does and masked by the checkpoint at its side; plain against
  refined on the checkpoint's map, and the share of images where refined has both lower SAD and
  lower gradient error.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from basnet.imaging import decode_for_model, upsample  # noqa: E402
from basnet.imaging.refine import estimate_foreground, refine_mask  # noqa: E402

SIDE = 256
SIZES = {2: (1224, 1632), 12: (3024, 4032)}


# ---------------------------------------------------------------- composites


def _texture(rng: np.random.Generator, height: int, width: int, cell: int, noise: float) -> np.ndarray:
    """Random colour cells of about ``cell`` px smoothed to full size, plus per-pixel noise; ~[0, 1]."""
    small = rng.random((max(2, height // cell), max(2, width // cell), 3)).astype(np.float32)
    texture = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return texture + rng.normal(0, noise, (height, width, 3)).astype(np.float32)


def composite(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(photo uint8 (H, W, 3), true alpha float32 (H, W), true foreground float32 (H, W, 3))."""
    rng = np.random.default_rng(seed)
    side = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    radius = side * rng.uniform(0.2, 0.3)
    angle = np.arctan2(yy - cy, xx - cx)
    boundary = radius * (1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6))
                         + 0.08 * np.sin(7 * angle + rng.uniform(0, 6)))
    softness = 1 + side / 60 * (0.5 + 0.5 * np.sin(2 * angle + rng.uniform(0, 6))) ** 4  # 1 px to side/60
    body = np.clip((boundary - np.hypot(yy - cy, xx - cx)) / softness + 0.5, 0, 1)
    del yy, xx, angle, boundary, softness
    strands = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(strands)
    for _ in range(60):
        a = rng.uniform(0, 2 * np.pi)
        r = radius * (1 + 0.15 * np.sin(3 * a))
        points = [(cx + r * np.cos(a), cy + r * np.sin(a))]
        for _ in range(20):
            a += rng.normal(0, 0.15)
            points.append((points[-1][0] + side * 0.006 * np.cos(a), points[-1][1] + side * 0.006 * np.sin(a)))
        draw.line(points, fill=int(rng.uniform(150, 255)), width=int(rng.integers(1, 4)))
    alpha = np.maximum(body, np.asarray(strands.filter(ImageFilter.GaussianBlur(0.6)), np.float32) / 255)
    del body
    fg_base, bg_base = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    while np.abs(fg_base - bg_base).sum() < 0.6:  # an object that differs from its background in colour
        bg_base = rng.uniform(0.1, 0.9, 3)
    fg = np.clip(fg_base + 0.35 * (_texture(rng, height, width, 40, 0.04) - 0.5), 0, 1).astype(np.float32)
    bg = np.clip(bg_base + 0.5 * (_texture(rng, height, width, 25, 0.04) - 0.5), 0, 1).astype(np.float32)
    a = alpha[..., None]
    photo = np.clip(np.rint((a * fg + (1 - a) * bg) * 255), 0, 255).astype(np.uint8)
    return photo, alpha, fg


# ---------------------------------------------------------------- measures


def alpha_errors(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """SAD, MSE and gradient error of an alpha in [0, 1] (uint8 is scaled) against the truth."""
    pred = pred.astype(np.float32) / 255 if pred.dtype == np.uint8 else pred.astype(np.float32)
    diff = np.abs(pred - truth)
    grad = ndimage.gaussian_gradient_magnitude(pred, 1.4) - ndimage.gaussian_gradient_magnitude(truth, 1.4)
    return {"sad": float(diff.sum()) / 1000, "mse": float(np.mean(diff * diff)),
            "grad": float((grad * grad).sum()) / 1000}


def colour_error(colours: np.ndarray, alpha: np.ndarray, fg: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error (grey levels) of ``colours`` cut out by ``alpha`` (uint8) over pure green,
    against the true foreground cut out by the true alpha, over the pixels of partial true alpha."""
    green = np.array([0, 1, 0], np.float32)
    a = (alpha.astype(np.float32) / 255)[..., None]
    t = truth[..., None]
    made = a * (colours.astype(np.float32) / 255) + (1 - a) * green
    real = t * fg + (1 - t) * green
    band = (truth > 0.01) & (truth < 0.99)
    return float(np.abs(made - real)[band].mean()) * 255


def shrink(alpha: np.ndarray) -> np.ndarray:
    """The true alpha as a perfect model would give it: area-averaged to SIDE x SIDE."""
    return cv2.resize(alpha, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def best_ms(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, (time.perf_counter() - start) * 1000)
    return best, out


# ---------------------------------------------------------------- sections


def _row(name: str, plain: dict, refined: dict) -> str:
    return (f"| {name} | {plain['sad']:.1f} / {refined['sad']:.1f} ({refined['sad'] / plain['sad']:.2f}x) | "
            f"{plain['mse'] * 1e3:.2f} / {refined['mse'] * 1e3:.2f} ({refined['mse'] / plain['mse']:.2f}x) | "
            f"{plain['grad']:.1f} / {refined['grad']:.1f} ({refined['grad'] / plain['grad']:.2f}x) |")


def upsampling_and_colours(counts: dict[int, int]) -> None:
    print("## Upsampling alone (the true alpha shrunk to 256 px), plain / refined\n")
    print("| composite | SAD | MSE x 1e3 | gradient error |\n|---|---|---|---|")
    ratios, colours, costs = [], [], {}
    for mp, count in counts.items():
        height, width = SIZES[mp]
        for seed in range(count):
            photo, alpha, fg = composite(1000 * mp + seed, height, width)
            prob = shrink(alpha)
            plain = np.asarray(upsample(prob, height, width))
            refine_ms, refined = best_ms(lambda: refine_mask(prob, photo, plain))
            p, r = alpha_errors(plain, alpha), alpha_errors(refined, alpha)
            ratios.append((r["sad"] / p["sad"], r["mse"] / p["mse"], r["grad"] / p["grad"]))
            print(_row(f"{mp} MP #{seed}", p, r), flush=True)
            truth8 = np.clip(np.rint(alpha * 255), 0, 255).astype(np.uint8)
            fg_ms, estimated = best_ms(lambda: estimate_foreground(photo, truth8))
            colours.append((colour_error(photo, truth8, fg, alpha), colour_error(estimated, truth8, fg, alpha),
                            colour_error(photo, refined, fg, alpha),
                            colour_error(estimate_foreground(photo, refined), refined, fg, alpha)))
            costs.setdefault(mp, []).append((refine_ms, fg_ms))
    sad, mse, grad = np.mean(ratios, axis=0)
    print(f"\nmean refined / plain: SAD {sad:.2f}x, MSE {mse:.2f}x, gradient error {grad:.2f}x "
          f"(worst image: SAD {max(r[0] for r in ratios):.2f}x, gradient {max(r[2] for r in ratios):.2f}x)\n")
    c = np.mean(colours, axis=0)
    print("## Cut-out colours over a new background (mean error, grey levels, partial-alpha pixels)\n")
    print("| alpha | naive (the photo's colours) | estimated foreground | estimated / naive |\n|---|---|---|---|")
    print(f"| true | {c[0]:.2f} | {c[1]:.2f} | {c[1] / c[0]:.2f}x |")
    print(f"| refined | {c[2]:.2f} | {c[3]:.2f} | {c[3] / c[2]:.2f}x |\n")
    print("## Cost per image (ms, wall, best of 3)\n")
    print("| size | refinement | foreground estimate |\n|---|---|---|")
    for mp, rows in costs.items():
        print(f"| {mp} MP | {np.median([r[0] for r in rows]):.0f} | {np.median([r[1] for r in rows]):.0f} |")
    print()


def end_to_end(weights: str, count: int) -> None:
    import torch

    from basnet.checkpoint import load_for_inference
    from basnet.data.sample import make_example
    from basnet.infer.predictor import MaskPredictor

    model, size = load_for_inference(weights, None)
    torch.set_num_threads(2)
    predictor = MaskPredictor(model.state_dict(), device=torch.device("cpu"), image_size=size)
    print(f"## End to end from {weights} ({size} px), plain / refined\n")
    print("| composite | SAD | MSE x 1e3 | gradient error |\n|---|---|---|---|")
    better = 0
    height, width = SIZES[2]
    for seed in range(count):
        # The sample's own kind of scene (basnet.data.sample), at 2 MP: objects the checkpoint knows.
        photo, mask = make_example(height, width, np.random.default_rng(5000 + seed))
        alpha = mask.astype(np.float32) / 255
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, "JPEG", quality=92)
        decoded = decode_for_model(buffer.getvalue(), size)
        prob = predictor.predict(decoded.image[None])[0]
        plain = np.asarray(upsample(prob, height, width))
        refined = refine_mask(prob, photo, plain)
        p, r = alpha_errors(plain, alpha), alpha_errors(refined, alpha)
        better += r["sad"] < p["sad"] and r["grad"] < p["grad"]
        print(_row(f"2 MP #{seed}", p, r), flush=True)
    print(f"\nrefined has lower SAD and lower gradient error on {better} of {count} images "
          f"({100 * better / count:.0f} %)\n")


def picture(path: str) -> None:
    """A crop of one 2 MP composite's edge, side by side: the photo, plain, refined, the true alpha,
    then the cut-out over green naive and with estimated colours (each panel 240 px, 2x)."""
    height, width = SIZES[2]
    photo, alpha, _ = composite(2000, height, width)
    prob = shrink(alpha)
    plain = np.asarray(upsample(prob, height, width))
    refined = refine_mask(prob, photo, plain)
    truth = np.clip(np.rint(alpha * 255), 0, 255).astype(np.uint8)
    # The crop: the object's right-hand edge through its widest row (strands blurred away), where
    # strands leave the body.
    body = cv2.blur(alpha, (31, 31)) > 0.5
    row = int(np.argmax(body.sum(axis=1)))
    col = int(np.flatnonzero(body[row])[-1])
    top, left = min(max(0, row - 60), height - 120), min(max(0, col - 60), width - 120)
    crop = (slice(top, top + 120), slice(left, left + 120))

    def grey(a):
        return np.repeat(a[crop][..., None], 3, axis=2)

    def over_green(colours, a):
        w = (a[crop].astype(np.float32) / 255)[..., None]
        return np.rint(w * colours[crop] + (1 - w) * np.array([0, 255, 0])).astype(np.uint8)

    panels = [photo[crop], grey(plain), grey(refined), grey(truth), over_green(photo, plain),
              over_green(estimate_foreground(photo, refined), refined)]
    gap = np.full((240, 6, 3), 255, np.uint8)
    strip = np.concatenate([x for p in panels for x in (cv2.resize(p, (240, 240), interpolation=cv2.INTER_NEAREST),
                                                       gap)][:-1], axis=1)
    Image.fromarray(strip).save(path, optimize=True)
    print(f"picture: {path} (photo, plain, refined, true alpha, plain cut-out, refined cut-out with estimated "
          "colours, both over green)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a training checkpoint for the end-to-end section")
    parser.add_argument("--count-2mp", type=int, default=4, help="composites of 2 MP")
    parser.add_argument("--count-12mp", type=int, default=2, help="composites of 12 MP")
    parser.add_argument("--count-e2e", type=int, default=10, help="composites of the end-to-end section")
    parser.add_argument("--picture", help="write the side-by-side edge crop here (PNG), e.g. docs/refine_edge.png")
    args = parser.parse_args()
    if args.picture:
        picture(args.picture)
    print(f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads\n")
    counts = {mp: n for mp, n in ((2, args.count_2mp), (12, args.count_12mp)) if n > 0}
    if counts:
        upsampling_and_colours(counts)
    if args.weights:
        end_to_end(args.weights, args.count_e2e)


if __name__ == "__main__":
    main()
