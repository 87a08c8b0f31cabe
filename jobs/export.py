"""Export a BASNet checkpoint to ONNX, then check ONNX Runtime against PyTorch on it.

    python jobs/export.py --weights runs/basnet/epoch_0100 --out basnet.onnx
    python jobs/export.py --weights basnet.pth --out basnet-fp16.onnx --fp16
    rembg p -m u2net_custom -x '{"model_path": "~/.u2net/basnet.onnx"}' photos/ cutouts/   # under rembg's home

Input: float32 (N, 3, H, W), RGB in [0, 1] normalised with the ImageNet mean and std; N, H and W are
dynamic (H and W multiples of 32). Output "saliency": (N, 1, H, W) in [0, 1], the sigmoid of the
refined map (--all-outputs adds the 7 side outputs). Needs the onnx extra: pip install -e '.[onnx]'.

Exit status: 0 when the check passes (largest difference at most 1e-4, 1e-2 with --fp16); 1 when it
does not (the file is kept for inspection); 2 for bad arguments.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basnet.config import parse_config  # noqa: E402
from basnet.console import setup_logging  # noqa: E402
from basnet.errors import JobFailed, UsageError, main_guard  # noqa: E402
from basnet.export.config import FP16_TOLERANCE, FP32_TOLERANCE, ExportConfig  # noqa: E402


@main_guard
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, __doc__.splitlines()[0])
    setup_logging()
    for chatty in ("onnx_ir", "onnxscript"):  # every optimisation pass logs at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    cfg.check()
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{exc.name} is not installed: pip install -e '.[onnx]'") from None
    from basnet.checkpoint import load_for_inference
    from basnet.export.onnx_model import check_onnx, export_onnx, trace_side

    model, size = load_for_inference(cfg.weights, cfg.image_size)
    export_onnx(model, cfg.out, image_size=size, opset=cfg.opset, fp16=cfg.fp16, all_outputs=cfg.all_outputs)
    mb = Path(cfg.out).stat().st_size / 2**20
    print(f"wrote {cfg.out} ({mb:.0f} MB, opset {cfg.opset}, {'fp16' if cfg.fp16 else 'fp32'}, traced at {trace_side(size)} px)",
          flush=True)
    rows = check_onnx(model, cfg.out, sizes=cfg.sizes(), all_outputs=cfg.all_outputs)
    tolerance = FP16_TOLERANCE if cfg.fp16 else FP32_TOLERANCE
    for row in rows:
        print(f"  batch {row.batch}, {row.size} x {row.size}: {row.outputs} output(s), largest |ONNX Runtime - "
              f"PyTorch| {row.max_diff:.2e}", flush=True)
    worst = max(row.max_diff for row in rows)
    if any(not math.isfinite(row.max_diff) for row in rows):
        raise JobFailed(f"ONNX Runtime's output is not finite (NaN or inf, e.g. a float16 overflow); {cfg.out} kept "
                        "for inspection")
    if worst > tolerance:
        raise JobFailed(f"ONNX Runtime differs from PyTorch by {worst:.2e}, above {tolerance:g}; {cfg.out} kept "
                        "for inspection")
    print(f"check passed: largest difference {worst:.2e} <= {tolerance:g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
