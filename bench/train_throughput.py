"""Training images/s of the Ray Train loop against a plain PyTorch loop, on the same model and batches.

    python bench/train_throughput.py                       # 64 and 256 px crops, whatever device there is
    python bench/train_throughput.py --sizes 64 --images 48 --batch-size 8

For each size it generates one DUTS-layout sample (``basnet.data.sample``) and measures, in one run:

* **plain**: one process using the whole machine (every core as a torch thread, or the GPU),
  ``basnet.train.engine.train_step`` on the sample's batches, decoded and cropped in memory beforehand
  (the data costs nothing). Warm-up steps are not timed.
* **ray**: ``jobs/train.py``'s own code (``basnet.train.ray_trainer.fit``) on a local Ray with one worker:
  Ray Data streams and decodes the same files, the worker trains with the same model, batch and
  precision. Its figure is the loop's own images/s of the last epoch (the first epoch also pays
  for starting the pipeline and is not counted), as the epoch line prints it.

The ratio ray / plain is the share of the machine the Ray loop turns into training. Weights are
random; throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def plain_images_per_s(sample: str, *, size: int, batch_size: int, precision: str, steps: int, warmup: int) -> float:
    """images/s of train_step in a plain loop over pre-decoded batches of ``sample``."""
    from basnet import storage
    from basnet.data.discovery import discover
    from basnet.imaging import decode_image, decode_mask
    from basnet.loss import HybridLoss
    from basnet.train.config import TrainConfig
    from basnet.train.engine import build_training_state, train_step
    from basnet.transforms import random_crop_flip, resize_image, resize_mask

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    images, masks = [], []
    for pair in discover(sample).train:
        image = resize_image(decode_image(storage.read_bytes(pair.image)), size)
        mask = resize_mask(decode_mask(storage.read_bytes(pair.mask)), size)
        image, mask = random_crop_flip(image, mask, size, rng)
        images.append(image)
        masks.append(mask)
    batches = [{"image": torch.from_numpy(np.stack(images[i:i + batch_size])),
                "mask": torch.from_numpy(np.stack(masks[i:i + batch_size]))}
               for i in range(0, len(images) - batch_size + 1, batch_size)]
    cfg = TrainConfig(backbone_weights="none", batch_size=batch_size, image_size=size, crop_size=size,
                      precision=precision)
    state = build_training_state(cfg, device)
    loss_fn = HybridLoss()
    state.model.train()
    timed = 0.0
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        loss = train_step(state.model, batch, loss_fn, state.optimizer, device=device, precision=state.precision,
                          scaler=state.scaler, memory_format=state.memory_format)
        float(loss)  # wait for the device before reading the clock
        if step >= warmup:
            timed += time.perf_counter() - start
    return steps * batch_size / timed


def ray_images_per_s(sample: str, storage_root: str, *, size: int, batch_size: int, precision: str,
                     epochs: int) -> tuple[float, list[float]]:
    """The Ray Train loop's own images/s of its last epoch (and of every epoch) on ``sample``."""
    from basnet.checkpoint import load_checkpoint
    from basnet.train.config import TrainConfig
    from basnet.train.ray_trainer import fit

    cfg = TrainConfig(data=sample, storage=storage_root, name=f"bench-{size}", epochs=epochs,
                      batch_size=batch_size, image_size=size, crop_size=size, backbone_weights="none",
                      precision=precision, max_failures=0, log_every=0).resolved()
    fit(cfg)
    per_epoch = [load_checkpoint(f"{storage_root}/bench-{size}/epoch_{e:04d}")["metrics"]["images_per_s"]
                 for e in range(1, epochs + 1)]
    return per_epoch[-1], per_epoch


def measure(size: int, *, images: int, batch_size: int, precision: str, epochs: int, steps: int,
            warmup: int) -> dict:
    from basnet.data.sample import generate_sample

    with tempfile.TemporaryDirectory() as tmp:
        sample = generate_sample(f"{tmp}/sample", n_train=images, n_test=2, size=size + size // 8)
        plain = plain_images_per_s(sample, size=size, batch_size=batch_size, precision=precision, steps=steps,
                                   warmup=warmup)
        ray_last, ray_epochs = ray_images_per_s(sample, f"{tmp}/runs", size=size, batch_size=batch_size,
                                                precision=precision, epochs=epochs)
    return {"size": size, "plain": plain, "ray": ray_last, "ray_epochs": ray_epochs, "ratio": ray_last / plain}


def table(rows: list[dict], device: str) -> str:
    lines = [f"training images/s on {device}: Ray Train loop (1 worker) vs a plain PyTorch loop, same batches",
             "| crop px | plain loop | Ray loop (last epoch) | Ray loop per epoch | ratio |",
             "|---:|---:|---:|---|---:|"]
    for r in rows:
        epochs = ", ".join(f"{v:.2f}" for v in r["ray_epochs"])
        lines.append(f"| {r['size']} | {r['plain']:.2f} | {r['ray']:.2f} | {epochs} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="crop sides, multiples of 32")
    parser.add_argument("--images", type=int, default=None, help="training images (default: 48 at <= 64 px, else 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 at <= 64 px, else 4")
    parser.add_argument("--epochs", type=int, default=2, help="Ray loop epochs; the last one is reported")
    parser.add_argument("--steps", type=int, default=None, help="timed plain-loop steps (default: one epoch)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    args = parser.parse_args(argv)
    from basnet.console import setup_logging
    from basnet.ray_init import init_ray

    setup_logging()
    init_ray()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    rows = []
    for size in args.sizes:
        small = size <= 64
        images = args.images or (48 if small else 8)
        batch = args.batch_size or (8 if small else 4)
        rows.append(measure(size, images=images, batch_size=batch, precision=args.precision, epochs=args.epochs,
                            steps=args.steps or max(1, images // batch), warmup=1))
        print(table(rows[-1:], device), flush=True)
    print()
    print(table(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
