"""The export job's options: one ``ExportConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from basnet import storage
from basnet.config import check_options, option
from basnet.errors import ConfigError, UsageError

__all__ = ["ExportConfig", "FP32_TOLERANCE", "FP16_TOLERANCE"]

FP32_TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch| on the saliency an fp32 export may show
FP16_TOLERANCE = 1e-2  # the same for an fp16 export


@dataclass
class ExportConfig:
    weights: str | None = option(None, "a training checkpoint directory, its model.pt, or the published basnet.pth "
                                     "(local or s3://)")
    out: str | None = option(None, "the .onnx file to write (local)")
    opset: int = option(18, "ONNX opset", at_least=17)
    fp16: bool = option(False, "store weights and compute in float16 (inputs and outputs stay float32); "
                               "checked to 1e-2 instead of 1e-4")
    all_outputs: bool = option(False, "return all 8 maps (refined first, then the 7 side outputs), each with its "
                                      "sigmoid; default: the refined map only")
    image_size: int | None = option(None, "the side the graph is traced at (32 is traced at 64) and its metadata names "
                                          "(the bulk job's default side), a multiple of 32 (default: the "
                                          "checkpoint's training size; any multiple of 32 runs)",
                                    multiple_of=32)
    check_sizes: str = option("64,96", "sides (multiples of 32) the export is checked at against PyTorch, "
                                       "at batch 1 and 3")
    overwrite: bool = option(False, "replace --out if it exists")

    def check(self) -> None:
        for key in ("weights", "out"):
            if not getattr(self, key):
                raise ConfigError(f"--{key} is required (see --help)")
        check_options(self)
        if not self.out.endswith(".onnx"):
            raise ConfigError(f"--out {self.out} should end in .onnx")
        if storage.is_s3(self.out):
            raise ConfigError("--out must be a local path (copy the .onnx to S3 afterwards)")
        self.sizes()
        if not storage.exists(self.weights):
            raise UsageError(f"checkpoint not found: {self.weights} (pass a training checkpoint directory, "
                             "its model.pt, or a basnet.pth file)")
        if storage.exists(self.out) and not self.overwrite:
            raise UsageError(f"{self.out} exists: pass --overwrite to replace it, or another --out")

    def sizes(self) -> list[int]:
        try:
            sizes = [int(s) for s in str(self.check_sizes).split(",") if s.strip()]
        except ValueError:
            sizes = []
        if not sizes or any(s < 32 or s % 32 for s in sizes):
            raise ConfigError(f"--check-sizes must be multiples of 32 separated by commas, got {self.check_sizes!r}")
        return sizes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
