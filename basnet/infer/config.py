"""The bulk-masking job's options: one ``InferConfig``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass

from basnet.config import PRECISIONS, check_options, option
from basnet.errors import ConfigError
from basnet.imaging import DEFAULT_MAX_PIXELS, ENCODINGS, FORMATS, REFINES, SUFFIXES, default_refine
from basnet.quality import NORMALIZES, ON_NO_OBJECT
from basnet.watchdog import DEFAULT_STALL_TIMEOUT_S

__all__ = ["InferConfig", "FORMATS", "RUNTIMES", "EXECUTORS", "cpu_batch_size", "is_onnx", "torch_instead"]

RUNTIMES = ("torch", "onnxruntime")
EXECUTORS = ("auto", "ray", "local")
# Options only Ray's scheduler uses: any of them asks for the Ray pipeline (basnet.infer.local).
_RAY_OPTIONS = ("address", "actors", "num_gpus_per_actor", "cpus_per_actor", "actor_resources", "task_resources")


@dataclass
class InferConfig:
    """Everything the bulk-masking job needs; ``None`` means "resolved from the weights or cluster"."""

    input: str | None = option(None, "images: a folder or prefix (local, file://, s3://) walked recursively, "
                                   "a .tar shard, a text (one path a line) or Parquet manifest, or one image")
    output: str | None = option(None, "folder or prefix for the masks; each mask mirrors its input's "
                                    "relative path with a .png suffix (.webp with --encoding webp)")
    weights: str | None = option(None, "a training checkpoint directory, its model.pt, the published "
                                     "basnet.pth, or a model.onnx from jobs/export.py (local or s3://)")
    format: str = option("mask", "mask: 8-bit soft saliency; binary: 0/255 at --threshold; "
                               "rgba: the image with the mask as alpha", choices=FORMATS)
    threshold: float = option(0.5, "saliency threshold in [0, 1] for --format binary", within=(0, 1))
    refine: str | None = option(None, "how the model's map reaches full size: none (plain bilinear, the test "
                                      "protocol's) or guided (the photo guides the edges; a cut-out also gets its "
                                      "edge colours re-estimated, so no old background shows) (default: guided for "
                                      "--format rgba, none for mask and binary; see docs/infer.md)",
                                choices=REFINES)
    normalize: str = option("minmax", "minmax: each map stretched to the full 0-1 range (the test protocol's, "
                                      "as published figures are measured); none: the model's sigmoid as it is, so a "
                                      "scene without an object gets a dark mask (see docs/infer.md)",
                            choices=NORMALIZES)
    on_no_object: str = option("keep", "what is written for an image whose map holds nothing salient (no_object "
                                       "in the manifest): keep its mask, or write an empty one",
                               choices=ON_NO_OBJECT)
    review: int = option(0, "at the end, a contact sheet of the N least confident masks (image, mask, cut-out) "
                            "and their list under <output>/_review/ (0: none)", within=(0, 1000))
    flag_below: float = option(0.5, "the summary counts the masks whose confidence is under this",
                               within=(0, 1))
    encoding: str = option("png", "how outputs are written, all lossless: png (fast compression), png-small "
                                  "(the smallest PNG, about 4x slower), webp (lossless WebP, --format rgba only: "
                                  "a 12 MP cut-out in half the time of png, 27 percent smaller)", choices=ENCODINGS)
    full_decode: bool = option(False, "decode JPEGs at full size before resizing for the model (the test "
                                      "protocol's exact input); by default a large JPEG is decoded at a reduced DCT "
                                      "scale that keeps at least twice the model's side (see docs/infer.md)")
    image_size: int | None = option(None, "model input side, a multiple of 32 (default: the checkpoint's "
                                        "training size; 256 for published weights; a .onnx's metadata)", multiple_of=32)
    batch_size: int | None = option(None, "images per model call (default: 8 on GPUs; on CPUs 8 at 64 px, "
                                          "2 at 128 px, 1 above: see docs/infer.md)",
                                    positive=True)
    task_batch_size: int = option(32, "images per batch of the CPU decode and write tasks", positive=True)
    precision: str = option("auto", "auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; "
                                  "or fp32, bf16, fp16", choices=PRECISIONS)
    runtime: str | None = option(None, "what runs the model: torch, or onnxruntime on CPU replicas only, even "
                                        "on a cluster with GPUs (a checkpoint is exported to ONNX once per job; "
                                        "needs the onnx extra on every node; see docs/infer.md) (default: "
                                        "onnxruntime for a .onnx --weights, else torch)",
                                 choices=RUNTIMES)
    channels_last: bool | None = option(None, "channels_last (NHWC) model and inputs (default: on GPUs)")
    compile: bool = option(False, "torch.compile the model in each replica (slower start, faster batches)")
    actors: int | None = option(None, "model replicas (default: one per GPU, or one per node without GPUs)",
                                positive=True)
    num_gpus_per_actor: float | None = option(None, "GPUs per model replica (default 1 if the cluster "
                                                  "has GPUs and the runtime is torch, else 0)", at_least=0)
    cpus_per_actor: float | None = option(None, "CPUs per model replica (default 1 with a GPU; without, "
                                              "its node's CPUs less the decode/write share)", positive=True)
    actor_threads: int | None = option(None, "torch (or ONNX Runtime) threads per model replica on CPU "
                                             "(default: its node's CPUs shared among the node's replicas; "
                                             "with a GPU, its CPUs)",
                                       positive=True)
    actor_resources: str | None = option(None, "custom Ray resources each model replica needs, as JSON, "
                                             "e.g. '{\"infer_node\": 1}' to pin replicas to tagged nodes")
    task_cpus: float = option(0.25, "CPUs per decode and per write task", positive=True)
    task_resources: str | None = option(None, "custom Ray resources per decode and write task, as JSON")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse (record as failed) images with more pixels than this "
                                                 "(200 MP: every camera file)", positive=True)
    max_failed_fraction: float = option(0.5, "stop with exit status 1 when more than this share of the inputs "
                                              "tried failed (checked from 100 tried on, and at the end)",
                                        within=(0, 1))
    stall_timeout: float = option(DEFAULT_STALL_TIMEOUT_S, "stop with exit status 1 and one line naming the "
                                  "stalled pipeline's operators and the cluster's free CPUs and GPUs when no "
                                  "batch comes out of it for this many seconds, the first included (0: wait forever)",
                                  at_least=0, at_least_means="(wait forever)")
    dry_run: bool = option(False, "list and plan only: print the counts (to mask, to skip, refused) and a "
                                "few examples, without loading the model")
    overwrite: bool = option(False, "redo inputs whose output already exists (default: skip them)")
    root: str | None = option(None, "folder a manifest's paths are mirrored relative to (default: the "
                                  "manifest's folder if it holds them all, else their common folder)")
    executor: str = option("auto", "where the stages run: ray (Ray Data on the cluster, or on a Ray started here), "
                                   "or local (this process: one machine, CPUs, no Ray start). auto: local when "
                                   "there is no cluster to join (no --address or $RAY_ADDRESS), no Ray-only option "
                                   "(--actors, --num-gpus-per-actor, --cpus-per-actor, --actor-resources, "
                                   "--task-resources) and, for --runtime torch, no GPU here; else ray "
                                   "(see docs/infer.md)", choices=EXECUTORS)
    address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    verbose: bool = option(False, "show Ray's own INFO logs on the console")

    def check(self) -> None:
        """Raises ConfigError naming the first bad option."""
        for key in ("input", "output", "weights"):
            if not getattr(self, key):
                raise ConfigError(f"--{key} is required (see --help)")
        check_options(self)
        if self.encoding == "webp" and self.format != "rgba":
            raise ConfigError(f"--encoding webp is for --format rgba cut-outs; --format {self.format} is written "
                              "as PNG: drop --encoding webp, or use png-small for the smallest files")
        if is_onnx(self.weights) and self.runtime == "torch":
            raise ConfigError(f"--weights {self.weights} is an ONNX model, which runs with --runtime onnxruntime: "
                              "drop runtime torch (from --runtime or --config), or pass the training checkpoint")
        if self.resolved_runtime() == "onnxruntime":
            self._check_onnxruntime()
        self.resources("actor_resources")
        self.resources("task_resources")
        if self.executor == "local" and (needs_ray := self.ray_options()):
            raise ConfigError(f"{needs_ray[0]} is for --executor ray (a Ray cluster); --executor local runs the job "
                              "in this process: drop one of them")

    def ray_options(self) -> list[str]:
        """The flags set that only Ray's scheduler uses (``--address`` first)."""
        return [f"--{key.replace('_', '-')}" for key in _RAY_OPTIONS if getattr(self, key)]

    def _check_onnxruntime(self) -> None:
        torch_only = [flag for flag, on in (("--compile", self.compile), ("--channels-last", self.channels_last),
                                            (f"--precision {self.precision}", self.precision in ("bf16", "fp16")),
                                            ("--num-gpus-per-actor", bool(self.num_gpus_per_actor)))
                      if on]
        other = torch_instead(self.weights)
        if torch_only:
            raise ConfigError(f"{torch_only[0]} is for --runtime torch (onnxruntime runs fp32 on CPUs): "
                              f"drop it, or {other}")
        needs = ("onnxruntime", "onnx") if is_onnx(self.weights) else ("onnxruntime", "onnxscript")  # or the exporter
        missing = [name for name in needs if importlib.util.find_spec(name) is None]
        if missing and not self.dry_run:  # a dry run loads no model
            raise ConfigError(f"--runtime onnxruntime needs {' and '.join(missing)}: "
                              f"pip install 'basnet-ray[onnx]' (on every node), or {other}")

    def resolved_refine(self) -> str:
        """``--refine``, or its default for ``--format``."""
        return self.refine or default_refine(self.format)

    def decode_options(self, batch_size: int) -> dict:
        """``basnet.infer.stages.decode_batch``'s options, ``batch_size`` rows a yielded batch."""
        return {"size": self.image_size, "max_pixels": self.max_pixels, "reduced": not self.full_decode,
                "keep_bytes": self.needs_source(), "overwrite": self.overwrite, "suffix": self.output_suffix(),
                "batch_size": batch_size}

    def model_options(self) -> dict:
        """``basnet.infer.predictor.MaskPredictor``'s options that come from the job's flags."""
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile,
                "runtime": self.runtime}

    def write_options(self) -> dict:
        """``basnet.infer.stages.write_batch``'s options (the image size resolved)."""
        return {"fmt": self.format, "threshold": self.threshold, "size": self.image_size, "encoding": self.encoding,
                "max_pixels": self.max_pixels, "refine": self.resolved_refine(), "normalize": self.normalize,
                "on_no_object": self.on_no_object}

    def needs_source(self) -> bool:
        """Whether the writer needs each image's bytes again (a cut-out, or a photo-guided map)."""
        return self.format == "rgba" or self.resolved_refine() == "guided"

    def output_suffix(self) -> str:
        """The outputs' suffix: ``.png``, or ``.webp`` for WebP cut-outs."""
        return SUFFIXES[self.encoding]

    def resolved_runtime(self) -> str:
        """``--runtime``, or when unset the one the weights need: onnxruntime for a .onnx file, else torch."""
        return self.runtime or ("onnxruntime" if is_onnx(self.weights) else "torch")

    def resources(self, key: str) -> dict[str, float]:
        """Parses a JSON resources option into ``{name: amount}``."""
        text = getattr(self, key)
        flag = "--" + key.replace("_", "-")
        if not text:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{flag} is not JSON: write it as '{{\"name\": 1}}'") from None
        ok = isinstance(value, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values())
        if not ok:
            raise ConfigError(f"{flag} must map resource names to positive numbers, got {text}")
        return {str(k): float(v) for k, v in value.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_onnx(weights: str | None) -> bool:
    """Whether ``--weights`` names an exported ONNX model (by its suffix) rather than a checkpoint."""
    return bool(weights) and weights.rstrip("/").lower().endswith(".onnx")


def torch_instead(weights: str | None) -> str:
    """How an error about ONNX Runtime tells the user to run ``weights`` on PyTorch instead."""
    return "pass the training checkpoint with --runtime torch" if is_onnx(weights) else "use --runtime torch"


def cpu_batch_size(image_size: int) -> int:
    """The model's batch on CPUs: batching pays at small sizes and costs at large ones (its maps
    outgrow the caches). Measured here, 2 threads: 64 px 132 ms an image alone, 86 ms in batches
    of 8; 256 px 1.51 s alone, 1.87 s in 4s, 2.00 s in 8s. So 8 at 64 px, scaled by the pixels."""
    return max(1, int(8 * (64 / image_size) ** 2))
