"""Stage 2 of bulk masking: the model, run by one actor per replica (needs torch)."""

from __future__ import annotations

import time

import numpy as np
import torch

from basnet.device import compile_model, memory_format, resolve_precision
from basnet.infer.manifest import FAILED, PENDING
from basnet.infer.naming import printable
from basnet.model import BASNet
from basnet.predict import predict_probabilities

__all__ = ["MaskPredictor"]


class MaskPredictor:
    """Saliency maps at the model's size for a decoded batch; rows not pending pass through.

    Args:
        state_dict: BASNet weights.
        device: Where the model runs.
        precision: ``--precision`` (auto: bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU).
        channels_last: ``--channels-last`` (None: on GPUs).
        compile: ``--compile``: torch.compile the model.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], *, device: torch.device, precision: str = "auto",
                 channels_last: bool | None = None, compile: bool = False) -> None:
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.memory_format = memory_format(channels_last, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same input size
        with torch.device("meta"):  # no random init of 87 M parameters that are overwritten next
            model = BASNet()
        model.load_state_dict(state_dict, strict=True, assign=True)
        self.model = compile_model(model.to(device).eval().to(memory_format=self.memory_format), compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "image"}
        images = batch["image"]
        out["prob"] = np.zeros(images.shape[:3], np.float32)
        pending = np.asarray(batch["status"] == PENDING, dtype=bool)
        if not pending.any():
            return out
        start = time.perf_counter()
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(images[pending]))
            prob = predict_probabilities(self.model, tensor, device=self.device, precision=self.precision,
                                         memory_format=self.memory_format)
            out["prob"][pending] = prob.numpy()
        except Exception as exc:  # e.g. out of GPU memory: record the batch, keep the job going
            out["status"] = np.where(pending, FAILED, out["status"]).astype(object)
            out["error"] = np.where(pending, printable(f"model failed: {exc}"), out["error"]).astype(object)
        out["seconds"] = out["seconds"] + pending * ((time.perf_counter() - start) / pending.sum())
        return out
