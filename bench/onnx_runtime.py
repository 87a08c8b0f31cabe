"""ONNX Runtime against PyTorch for the bulk job's CPU model call: same weights, same batches.

    python bench/onnx_runtime.py                      # 64 px batch 8, 128 px batch 2, 256 px batch 1
    python bench/onnx_runtime.py --threads 1 --rounds 5

The bulk job's CPU replica runs the model on uint8 batches at its side, at the batch size it picks
on CPUs (8 at 64 px, 2 at 128 px, 1 above) with ``--actor-threads`` torch threads (one replica per
node: as many threads as the node has CPUs). This script times exactly that call in one process,
PyTorch (``basnet.predict.predict_probabilities``, fp32, the job's CPU defaults) against an
ONNX Runtime session of the same weights exported by ``basnet.export`` (intra-op threads set to
the same count), alternating the two per round so that drift on a busy machine hits both. It
prints the median seconds per image of each, the ratio (PyTorch / ONNX Runtime: above 1 means ONNX
Runtime is faster), and the largest difference of the min-max normalised maps in grey levels.
Weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet.device import to_model_input  # noqa: E402
from basnet.export.onnx_model import INPUT, export_onnx  # noqa: E402
from basnet.model import BASNet  # noqa: E402
from basnet.predict import predict_probabilities  # noqa: E402


def _minmax(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    lo, hi = flat.min(1)[:, None, None], flat.max(1)[:, None, None]
    return (maps - lo) / np.maximum(hi - lo, 1e-8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="64x8,128x2,256x1", help="SIDExBATCH, comma separated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import onnxruntime as ort

    from basnet.export.onnx_model import ort_session

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BASNet().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "basnet.onnx")
        export_onnx(model, path, image_size=64)
        session = ort_session(path, threads=args.threads)  # as a bulk-job replica opens it
        print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
              f"{args.rounds} rounds per case (median)")
        print(f"{'side':>5} {'batch':>5} {'torch s/img':>12} {'ORT s/img':>10} {'ratio':>6} {'max diff (grey)':>16}")
        rng = np.random.default_rng(0)
        for case in args.cases.split(","):
            side, batch = (int(v) for v in case.split("x"))
            images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
            x = to_model_input(images).numpy()
            run_torch = lambda: predict_probabilities(model, torch.from_numpy(images),  # noqa: E731
                                                      device=torch.device("cpu")).numpy()
            run_ort = lambda: session.run(None, {INPUT: x})[0][:, 0]  # noqa: E731
            ours, theirs = run_torch(), run_ort()  # warm-up (and the agreement check)
            diff = float(np.abs(np.rint(_minmax(ours) * 255) - np.rint(_minmax(theirs) * 255)).max())
            times = {"torch": [], "ort": []}
            for _ in range(args.rounds):
                for name, fn in (("torch", run_torch), ("ort", run_ort)):
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) / batch)
            t, o = statistics.median(times["torch"]), statistics.median(times["ort"])
            print(f"{side:>5} {batch:>5} {t:>12.4f} {o:>10.4f} {t / o:>5.2f}x {diff:>16.0f}")


if __name__ == "__main__":
    main()
