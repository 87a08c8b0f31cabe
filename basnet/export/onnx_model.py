"""BASNet as an ONNX graph, and its check against PyTorch (needs the ``.[onnx]`` extra).

The graph takes what the model takes, a float32 NCHW image scaled to [0, 1] and normalised with
the ImageNet mean and std (``basnet.device.to_model_input``), with a dynamic batch and a dynamic
height and width (multiples of 32, BASNet's downsampling). Its first output is the refined map with
its sigmoid applied, (N, 1, H, W) in [0, 1]: what rembg's custom session and plain ONNX Runtime
use as is (both min-max normalise it, as ``basnet.predict`` does). ``--all-outputs`` adds the seven
side outputs, each with its sigmoid. ``--fp16`` casts inside the graph: float32 in and out,
float16 weights and arithmetic. The file's metadata names the side the model was trained at
(``basnet.image_size``): the bulk-masking job's default size for ``--weights model.onnx``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from basnet.device import to_model_input
from basnet.export.ort import SIZE_KEY, onnx_image_size, ort_session
from basnet.model import BASNet

__all__ = ["Saliency", "export_onnx", "onnx_bytes", "onnx_image_size", "check_onnx", "CheckRow", "ort_session",
           "trace_side", "SIZE_KEY"]

logger = logging.getLogger(__name__)

INPUT, OUTPUTS = "image", ("saliency", "side1", "side2", "side3", "side4", "side5", "side6", "bridge")


class Saliency(nn.Module):
    """The exported function: sigmoid of the refined map (or of all eight), optionally in float16
    (on a half copy: ``model`` itself stays as it is, the float32 reference of the check)."""

    def __init__(self, model: BASNet, *, all_outputs: bool = False, fp16: bool = False) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half() if fp16 else model
        self.all_outputs, self.fp16 = all_outputs, fp16

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        maps = self.model(x.half() if self.fp16 else x)
        maps = maps if self.all_outputs else maps[:1]
        out = tuple(torch.sigmoid(m).float() for m in maps)
        return out if self.all_outputs else out[0]


def export_onnx(model: BASNet, path: str, *, image_size: int, opset: int = 18, fp16: bool = False,
                all_outputs: bool = False) -> None:
    """Writes ``model`` (eval mode, on the CPU) as one ONNX file at ``path`` (no external data), with
    ``image_size`` in its metadata (``SIZE_KEY``).

    The graph is traced at ``image_size``, or at 64 px when that is 32: ``torch.export`` treats a
    dimension of size 1 (32 px / 32) as a constant, which would fix the graph's height and width."""
    program = _program(model, image_size=image_size, opset=opset, fp16=fp16, all_outputs=all_outputs)
    tmp = f"{path}.tmp-{os.getpid()}"
    program.save(tmp, external_data=False)
    os.replace(tmp, path)  # never a half-written model at --out


def onnx_bytes(model: BASNet, *, image_size: int) -> bytes:
    """``export_onnx``'s file as bytes (float32, the refined map only), serialised in memory: the
    same bytes, without writing 350 MB to a temporary file and reading them back."""
    return _program(model, image_size=image_size).model_proto.SerializeToString()


def _program(model: BASNet, *, image_size: int, opset: int = 18, fp16: bool = False, all_outputs: bool = False):
    """The exporter's ``ONNXProgram`` of ``model`` (see :func:`export_onnx`)."""
    wrapper = Saliency(model.eval(), all_outputs=all_outputs, fp16=fp16).eval()
    side = trace_side(image_size)
    example = torch.zeros(2, 3, side, side)
    batch = torch.export.Dim("batch", min=1, max=1024)
    height, width = torch.export.Dim("h32", min=1, max=512), torch.export.Dim("w32", min=1, max=512)
    names = list(OUTPUTS if all_outputs else OUTPUTS[:1])
    chatter = io.StringIO()  # the exporter prints its four steps on stdout
    with torch.no_grad(), contextlib.redirect_stdout(chatter):
        program = torch.onnx.export(wrapper, (example,), None, input_names=[INPUT], output_names=names,
                                    opset_version=opset, dynamo=True, verbose=False,
                                    dynamic_shapes={"x": {0: batch, 2: 32 * height, 3: 32 * width}})
    program.model.metadata_props[SIZE_KEY] = str(image_size)
    logger.debug("exporter: %s", chatter.getvalue())
    return program


def trace_side(image_size: int) -> int:
    """The side ``export_onnx`` traces at: ``image_size``, but 64 for 32 (see there)."""
    return max(image_size, 64)


@dataclass
class CheckRow:
    batch: int
    size: int
    max_diff: float
    outputs: int


def check_onnx(model: BASNet, path: str, *, sizes: list[int], batches: tuple[int, ...] = (1, 3),
               all_outputs: bool = False, seed: int = 0) -> list[CheckRow]:
    """ONNX Runtime against PyTorch (float32, eval) on random images: the largest difference of
    every output, per batch and size."""
    session = ort_session(path)
    reference = Saliency(model.eval(), all_outputs=all_outputs).eval()
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        for batch in batches:
            x = to_model_input(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
            with torch.no_grad():
                expected = reference(x)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = session.run(None, {INPUT: x.numpy()})
            diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
            rows.append(CheckRow(batch, size, diff, len(got)))
    return rows
