"""Bulk masking without Ray: the config, input discovery, safe output paths, tar walking, the
three pipeline stages as plain functions on numpy batches, post-processing and the manifest.

``basnet.ray_infer`` wires the stages into a Ray Data pipeline; everything here runs (and is
tested) in one process on plain arrays.

Output naming: an input at relative path ``a/b/x.jpg`` (relative to the input folder, the
manifest's folder or ``--root``) gets its mask at ``<output>/a/b/x.png``. When two inputs of one
folder share a stem (``x.jpg`` and ``x.png``), the first in sorted order keeps ``x.png`` and the
others get their full name plus ``.png`` (``x.png.png``). A tar shard ``a/s-000.tar`` holding
``img/x.jpg`` gets ``<output>/a/s-000/img/x.png``. Names holding ``..`` are refused; leading
``/``, empty and ``.`` parts are dropped and control characters become ``_``, so every output
path stays under ``--output``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import posixpath
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from basnet import storage
from basnet.cli import UsageError
from basnet.config import PRECISIONS, ConfigError, option
from basnet.device import compile_model, memory_format, resolve_precision
from basnet.engine import predict_probabilities
from basnet.model import BASNet
from basnet.transforms import (IMAGE_SUFFIXES, ImageDecodeError, decode_image, encode_png,
                               has_image_suffix, resize_image, resize_mask)

logger = logging.getLogger(__name__)

__all__ = ["InferConfig", "InferPlan", "InferSummary", "WorkItem", "UnsafeNameError", "FORMATS",
           "MANIFEST_DIR", "CONFIG_DIR", "MANIFEST_SCHEMA", "plan_inference", "safe_parts", "OutputNames",
           "read_manifest", "decode_batch", "MaskPredictor", "write_batch", "render_output",
           "ManifestWriter", "Progress", "read_run_manifest"]

FORMATS = ("mask", "binary", "rgba")
MANIFEST_DIR = "_manifest"  # Parquet parts only, so pyarrow/Ray can read the folder as one table
CONFIG_DIR = "_config"
TAR_SUFFIX = ".tar"
PUBLISHED_IMAGE_SIZE = 256  # the published basnet.pth was trained at 256 x 256
PENDING, WRITTEN, SKIPPED, FAILED = "pending", "written", "skipped", "failed"

MANIFEST_SCHEMA = pa.schema([
    ("input", pa.string()), ("output", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("seconds", pa.float64()), ("run_id", pa.string()),
])


@dataclass
class InferConfig:
    """Everything the bulk-masking job needs; ``None`` means "resolved from the weights or cluster"."""

    input: str | None = option(None, "images: a folder or prefix (local, file://, s3://) walked recursively, "
                                   "a .tar shard, a text (one path a line) or Parquet manifest, or one image")
    output: str | None = option(None, "folder or prefix for the masks; each mask mirrors its input's "
                                    "relative path with a .png suffix")
    weights: str | None = option(None, "a training checkpoint directory, its model.pt, or the published "
                                     "basnet.pth (local or s3://)")
    format: str = option("mask", "mask: 8-bit soft saliency; binary: 0/255 at --threshold; "
                               "rgba: the image with the mask as alpha", choices=FORMATS)
    threshold: float = option(0.5, "saliency threshold in [0, 1] for --format binary")
    image_size: int | None = option(None, "model input side, a multiple of 32 (default: the checkpoint's "
                                        "training size; 256 for published weights)")
    batch_size: int = option(8, "images per model call")
    task_batch_size: int = option(32, "images per batch of the CPU decode and write tasks")
    precision: str = option("auto", "auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; "
                                  "or fp32, bf16, fp16", choices=PRECISIONS)
    channels_last: bool | None = option(None, "channels_last (NHWC) model and inputs (default: on GPUs)")
    compile: bool = option(False, "torch.compile the model in each replica (slower start, faster batches)")
    actors: int | None = option(None, "model replicas (default: one per GPU, or one per node without GPUs)")
    num_gpus_per_actor: float | None = option(None, "GPUs per model replica (default 1 if the cluster "
                                                  "has GPUs, else 0)")
    cpus_per_actor: float | None = option(None, "CPUs per model replica (default 1 with a GPU; without, "
                                              "its node's CPUs less the decode/write share)")
    actor_resources: str | None = option(None, "custom Ray resources each model replica needs, as JSON, "
                                             "e.g. '{\"infer_node\": 1}' to pin replicas to tagged nodes")
    task_cpus: float = option(0.25, "CPUs per decode and per write task")
    task_resources: str | None = option(None, "custom Ray resources per decode and write task, as JSON")
    max_pixels: int = option(64_000_000, "refuse (record as failed) images with more pixels than this")
    overwrite: bool = option(False, "redo inputs whose output already exists (default: skip them)")
    root: str | None = option(None, "folder a manifest's paths are mirrored relative to (default: the "
                                  "manifest's folder if it holds them all, else their common folder)")
    address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    verbose: bool = option(False, "show Ray's own INFO logs on the console")

    def check(self) -> None:
        """Raises ConfigError naming the first bad option."""
        for key in ("input", "output", "weights"):
            if not getattr(self, key):
                raise ConfigError(f"--{key} is required (see --help)")
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise ConfigError(f"--image-size {self.image_size} is not a multiple of 32 (>= 32): "
                              "BASNet downsamples by 32")
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r} is not one of {', '.join(FORMATS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must lie in [0, 1], got {self.threshold}")
        positive = {"batch_size": self.batch_size, "task_batch_size": self.task_batch_size,
                    "actors": self.actors, "max_pixels": self.max_pixels,
                    "task_cpus": self.task_cpus, "cpus_per_actor": self.cpus_per_actor}
        for key, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {value}")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ConfigError("--num-gpus-per-actor must be 0 or more")
        self.resources("actor_resources")
        self.resources("task_resources")

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


@dataclass
class WorkItem:
    """One row of the pipeline's input: an image file, or a tar shard expanded by its decode task."""

    kind: str  # "image" or "tar"
    source: str  # the image's or shard's URI
    output: str  # the mask's URI; for a shard, the folder its masks go under


@dataclass
class InferPlan:
    """What the driver decided before any Ray work: inputs, their outputs, the weights."""

    config: InferConfig  # image_size resolved
    run_id: str
    output_root: str
    items: list[WorkItem]
    decided: list[dict]  # manifest rows settled on the driver: skipped or refused inputs
    state_dict: dict[str, torch.Tensor]
    config_uri: str
    has_shards: bool = False

    @property
    def known_total(self) -> int:
        """Inputs known before the run (tar shards add their members as they are read)."""
        return len(self.decided) + sum(item.kind == "image" for item in self.items)


@dataclass
class InferSummary:
    """Counts and locations of a finished run; ``written + skipped + failed == total``."""

    written: int
    skipped: int
    failed: int
    seconds: float
    output: str
    manifest: list[str]
    config: str
    run_id: str

    @property
    def total(self) -> int:
        return self.written + self.skipped + self.failed

    @property
    def images_per_second(self) -> float:
        """Inputs processed (written or failed; skipped ones cost nothing) per second of the run."""
        return (self.written + self.failed) / max(self.seconds, 1e-9)

    def line(self) -> str:
        return (f"written {self.written}, skipped {self.skipped}, failed {self.failed} of {self.total} "
                f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)")


class UnsafeNameError(ValueError):
    """An input name that cannot be mapped to an output path under ``--output``."""


# ---------------------------------------------------------------------------------------------
# Names and paths


def _clean_part(part: str) -> str:
    """Control characters and undecodable bytes (surrogates from tar) become ``_``."""
    return "".join("_" if ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF else c
                   for c in part)


def safe_parts(name: str) -> list[str]:
    """Splits a relative name into path parts that cannot leave the folder they are joined to.

    ``\\`` counts as a separator; leading ``/``, empty and ``.`` parts are dropped; control
    characters become ``_``.

    Raises:
        UnsafeNameError: The name holds a ``..`` part, or nothing is left of it.
    """
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeNameError(f"unsafe name {printable(name)!r}: '..' would leave --output")
    if not parts:
        raise UnsafeNameError(f"unusable name {printable(name)!r}")
    return [_clean_part(p) for p in parts]


def printable(text: str) -> str:
    """A string that Arrow and terminals accept: undecodable bytes shown as ``\\xNN``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class OutputNames:
    """Assigns each input a distinct ``.png`` output name relative to the output root."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def claim(self, relative: str) -> str:
        """Returns the output's relative path for an input's relative path.

        Raises:
            UnsafeNameError: Unsafe name, or both candidate names are taken.
        """
        parts = safe_parts(relative)
        folder, name = parts[:-1], parts[-1]
        stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
        for candidate in (stem + ".png", name + ".png"):
            path = "/".join([*folder, candidate])
            if path not in self.taken:
                self.taken.add(path)
                return path
        raise UnsafeNameError(f"output name {path} is taken by another input")


def canonical(uri: str) -> str:
    """A URI in the form ``storage.list_files`` returns, so listed outputs compare equal."""
    uri = str(uri)
    if storage.is_s3(uri):
        return uri.rstrip("/")
    _, path = storage.filesystem(uri)
    return "file://" + path if uri.startswith("file://") else path


def _scheme(uri: str) -> str:
    return "s3" if storage.is_s3(uri) else "file"


def _is_under(uri: str, root: str) -> bool:
    if _scheme(uri) != _scheme(root):
        return False
    try:
        storage.relative_to(uri, root)
        return True
    except storage.StorageError:
        return False


def output_uri(output_root: str, relative: str) -> str:
    """Joins a safe relative path onto the output root, checking the result stays below it."""
    uri = storage.join(output_root, *relative.split("/"))
    if not _is_under(uri, output_root):  # belt and braces: safe_parts already guarantees it
        raise UnsafeNameError(f"{printable(relative)!r} would leave --output")
    return uri


# ---------------------------------------------------------------------------------------------
# Inputs


def _manifest_column(table: pa.Table, uri: str) -> list:
    for name in ("path", "input", "image", "uri"):
        if name in table.column_names:
            return table.column(name).to_pylist()
    strings = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if len(strings) == 1:
        return table.column(strings[0]).to_pylist()
    raise UsageError(f"Parquet manifest {uri} has no 'path' column: name the column of image paths 'path'")


def _manifest_entries(uri: str, data: bytes) -> list[str]:
    if uri.lower().endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"manifest {uri} is not a readable Parquet file ({exc})") from None
        return [str(v).strip() for v in _manifest_column(table, uri) if v is not None]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"manifest {uri} is not UTF-8 text: pass a folder, a .tar shard, "
                         "a text manifest (one path a line) or a .parquet manifest") from None
    return [line.strip() for line in text.splitlines()]


def read_manifest(uri: str) -> list[str]:
    """Image URIs listed by a text (one a line, ``#`` comments) or Parquet (``path`` column) manifest.

    Relative entries are resolved against the manifest's folder; duplicates are dropped.
    """
    base = posixpath.dirname(str(uri).rstrip("/"))
    out: dict[str, None] = {}
    for entry in _manifest_entries(uri, storage.read_bytes(uri)):
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry and not os.path.isabs(entry):
            entry = storage.join(base, entry)
        out[canonical(entry)] = None
    if not out:
        raise UsageError(f"manifest {uri} lists no paths")
    return list(out)


def _common_root(entries: Sequence[str], preferred: str) -> str:
    """``preferred`` when it holds every entry, else the entries' deepest common folder."""
    if all(_is_under(e, preferred) for e in entries):
        return preferred
    schemes = {_scheme(e) for e in entries}
    if len(schemes) > 1:
        raise UsageError("the manifest mixes s3:// and local paths: pass --root to say what outputs mirror")
    paths = [storage.filesystem(posixpath.dirname(e))[1] for e in entries]
    common = posixpath.commonpath(paths)
    return "s3://" + common if schemes == {"s3"} else common


def list_inputs(uri: str, output_root: str) -> list[str]:
    """Images and tar shards under a folder, recursively; anything under the output is left out."""
    found = storage.list_files(uri, IMAGE_SUFFIXES + (TAR_SUFFIX,))
    return [f for f in found if not _is_under(f, output_root)]


def collect_inputs(cfg: InferConfig, output_root: str, images: Sequence[str] | None) -> tuple[list[str], str]:
    """Returns the input URIs and the root their outputs mirror.

    Raises:
        UsageError: The input is missing, unreadable, or holds no images.
    """
    if images is not None:
        root = cfg.root or cfg.input
        return list(dict.fromkeys(canonical(i) for i in images)), canonical(root)
    uri = cfg.input
    try:
        if storage.is_dir(uri):
            return list_inputs(uri, output_root), canonical(cfg.root or uri)
        if not storage.exists(uri):
            raise UsageError(f"input not found: {uri} (pass a folder, a .tar shard, a manifest or an image)")
        if uri.lower().endswith(TAR_SUFFIX) or has_image_suffix(uri):
            return [canonical(uri)], canonical(cfg.root or posixpath.dirname(uri.rstrip("/")))
        entries = read_manifest(uri)
    except OSError as exc:
        raise UsageError(f"cannot read --input {uri}: {str(exc).splitlines()[0]}") from None
    preferred = canonical(cfg.root or posixpath.dirname(uri.rstrip("/")))
    return entries, preferred if cfg.root else _common_root(entries, preferred)


def failed_row(input_uri: str, error: str, output: str = "", seconds: float = 0.0) -> dict:
    return {"input": printable(input_uri), "output": output, "width": 0, "height": 0,
            "status": FAILED, "error": printable(error), "seconds": seconds}


def assign_outputs(sources: Sequence[str], root: str, output_root: str,
                   existing: set[str]) -> tuple[list[WorkItem], list[dict]]:
    """Maps inputs to outputs; inputs already done (in ``existing``) or unusable are settled here."""
    names, items, decided = OutputNames(), [], []
    for source in sources:
        try:
            if not _is_under(source, root):
                raise UnsafeNameError(f"not under the root {root} (set --root)")
            relative = storage.relative_to(source, root)
            if relative.lower().endswith(TAR_SUFFIX):
                folder = "/".join(safe_parts(relative[: -len(TAR_SUFFIX)]))
                items.append(WorkItem("tar", source, output_uri(output_root, folder)))
                continue
            out = output_uri(output_root, names.claim(relative))
        except (UnsafeNameError, storage.StorageError) as exc:
            decided.append(failed_row(source, str(exc)))
            continue
        if out in existing:
            decided.append({**failed_row(source, ""), "output": out, "status": SKIPPED})
        else:
            items.append(WorkItem("image", source, out))
    return items, decided


# ---------------------------------------------------------------------------------------------
# Planning on the driver


def new_run_id() -> str:
    """Sortable by start time and unique, so a re-run never overwrites an earlier run's files."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _load_weights(cfg: InferConfig) -> tuple[dict[str, torch.Tensor], int]:
    """Loads and checks the weights; returns the state dict and the inference size."""
    from basnet.checkpoint import checkpoint_config, load_model

    state = load_model(cfg.weights).state_dict()
    size = cfg.image_size
    if size is None:
        trained = checkpoint_config(cfg.weights) or {}
        size = int(trained.get("image_size") or PUBLISHED_IMAGE_SIZE)
    return state, size


def save_config(cfg: InferConfig, uri: str, run_id: str) -> None:
    """Writes the resolved config (loadable again with ``--config``) beside the outputs."""
    text = f"# basnet-ray bulk masking, run {run_id}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    storage.write_bytes(uri, text.encode())


def plan_inference(cfg: InferConfig, *, images: Sequence[str] | None = None) -> InferPlan:
    """Everything that can fail on bad arguments, checked before any Ray work.

    Args:
        cfg: The job's options.
        images: Explicit image URIs to mask instead of listing ``cfg.input``; their outputs mirror
            their paths relative to ``cfg.root`` (or ``cfg.input`` when ``root`` is unset).

    Raises:
        ConfigError, UsageError, CheckpointError: Bad options, missing input or unreadable
            weights, or an output that cannot be written.
    """
    cfg = dataclasses.replace(cfg, input=cfg.input or cfg.root)
    cfg.check()
    output_root = canonical(cfg.output)
    sources, root = collect_inputs(cfg, output_root, images)
    if not sources:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or .tar shards under {cfg.input}")
    state, size = _load_weights(cfg)
    cfg = dataclasses.replace(cfg, image_size=size)
    run_id = new_run_id()
    config_uri = storage.join(output_root, CONFIG_DIR, f"config-{run_id}.yaml")
    try:
        save_config(cfg, config_uri, run_id)  # doubles as the check that --output is writable
        existing = set() if cfg.overwrite else set(storage.list_files(output_root, [".png"]))
    except OSError as exc:
        raise UsageError(f"cannot write to --output {cfg.output}: {str(exc).splitlines()[0]}") from None
    items, decided = assign_outputs(sources, root, output_root, existing)
    return InferPlan(cfg, run_id, output_root, items, decided, state, config_uri,
                     has_shards=any(i.kind == "tar" for i in items))


# ---------------------------------------------------------------------------------------------
# Stage 1: read and decode (CPU tasks)


def _pending_row(input_uri: str, output: str, data: bytes, *, size: int, max_pixels: int,
                 keep_bytes: bool, start: float) -> tuple[dict, np.ndarray | None]:
    """Decodes one input; a failure becomes a failed row instead of an exception."""
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return failed_row(input_uri, str(exc), output, time.perf_counter() - start), None
    height, width = image.shape[:2]
    resized = resize_image(image, size)
    row = {"input": printable(input_uri), "output": output, "width": width, "height": height,
           "status": PENDING, "error": "", "seconds": time.perf_counter() - start,
           "data": data if keep_bytes else b""}
    return row, resized


def _image_row(item: dict, **kwargs: Any) -> tuple[dict, np.ndarray | None]:
    start = time.perf_counter()
    try:
        data = storage.read_bytes(item["source"])
    except Exception as exc:  # one unreadable object must not fail the job
        return failed_row(item["source"], f"cannot read: {exc}", item["output"],
                          time.perf_counter() - start), None
    return _pending_row(item["source"], item["output"], data, start=start, **kwargs)


def _tar_member_row(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str, names: OutputNames,
                    folder: str, existing: set[str], **kwargs: Any) -> tuple[dict, np.ndarray | None]:
    start = time.perf_counter()
    display = f"{shard}#{member.name}"
    try:
        out = output_uri(folder, names.claim(member.name))
    except UnsafeNameError as exc:
        return failed_row(display, str(exc)), None
    if out in existing:
        return {**failed_row(display, ""), "output": out, "status": SKIPPED}, None
    if not member.isfile():
        return failed_row(display, "not a regular file in the tar (a link or device)", out), None
    data = tar.extractfile(member).read()
    return _pending_row(display, out, data, start=start, **kwargs)


def _tar_rows(item: dict, *, overwrite: bool, **kwargs: Any) -> Iterator[tuple[dict, np.ndarray | None]]:
    """Streams a shard once, front to back (no seeks, so S3 shards are read in one GET)."""
    shard, folder = item["source"], item["output"]
    existing = set() if overwrite else set(storage.list_files(folder, [".png"]))
    names, seen = OutputNames(), 0
    try:
        fs, path = storage.filesystem(shard)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isdir() or not has_image_suffix(member.name):
                    continue  # webdataset shards also hold .json/.txt/.cls sidecars
                seen += 1
                yield _tar_member_row(tar, member, shard, names, folder, existing, **kwargs)
    except Exception as exc:  # truncated or corrupt shard: keep what was read, record the rest
        yield failed_row(shard, f"unreadable tar shard after {seen} images: {exc}"), None


def _batch_from_rows(rows: list[tuple[dict, np.ndarray | None]], size: int) -> dict[str, np.ndarray]:
    """Columns for Ray Data; failed and skipped rows carry a zero image so the column stays dense."""
    blank = np.zeros((size, size, 3), np.uint8)
    batch = {key: np.array([r[key] for r, _ in rows], dtype=object)
             for key in ("input", "output", "status", "error")}
    batch["width"] = np.array([r["width"] for r, _ in rows], dtype=np.int64)
    batch["height"] = np.array([r["height"] for r, _ in rows], dtype=np.int64)
    batch["seconds"] = np.array([r["seconds"] for r, _ in rows], dtype=np.float64)
    batch["data"] = np.array([r.get("data", b"") for r, _ in rows], dtype=object)
    batch["image"] = np.stack([blank if image is None else image for _, image in rows])
    return batch


def decode_batch(batch: dict[str, np.ndarray], *, size: int, max_pixels: int, keep_bytes: bool,
                 overwrite: bool, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Stage 1: work items in, decoded rows out, at most ``batch_size`` rows per yielded batch.

    Each image is resized to ``size`` for the model; its original size (after EXIF rotation) is
    kept for the way back. Image bytes travel on only for ``--format rgba`` (``keep_bytes``).
    """
    kwargs = {"size": size, "max_pixels": max_pixels, "keep_bytes": keep_bytes}
    rows: list[tuple[dict, np.ndarray | None]] = []
    for kind, source, output in zip(batch["kind"], batch["source"], batch["output"]):
        item = {"source": str(source), "output": str(output)}
        produced = ([_image_row(item, **kwargs)] if kind == "image"
                    else _tar_rows(item, overwrite=overwrite, **kwargs))
        for row in produced:
            rows.append(row)
            if len(rows) >= batch_size:
                yield _batch_from_rows(rows, size)
                rows = []
    if rows:
        yield _batch_from_rows(rows, size)


# ---------------------------------------------------------------------------------------------
# Stage 2: the model (an actor per replica)


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


# ---------------------------------------------------------------------------------------------
# Stage 3: post-process, encode and write (CPU tasks)


def to_grey(prob: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit grey levels, rounded to nearest."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def render_output(prob: np.ndarray, height: int, width: int, *, fmt: str, threshold: float = 0.5,
                  source: bytes = b"") -> bytes:
    """The output PNG for one saliency map, at the image's original size.

    Args:
        prob: float (S, S) saliency in [0, 1] (sigmoid of the refined output, min-max normalised).
        height, width: The original image's size (after EXIF rotation).
        fmt: ``mask`` (8-bit soft), ``binary`` (0 or 255 at ``threshold``) or ``rgba`` (the
            decoded image with the soft mask as alpha; needs ``source``, the image's bytes).

    Returns:
        PNG bytes.
    """
    full = resize_mask(np.asarray(prob, np.float32), (height, width))  # bilinear, before quantising
    if fmt == "binary":
        return encode_png(np.where(full >= threshold, 255, 0).astype(np.uint8))
    mask = to_grey(full)
    if fmt == "mask":
        return encode_png(mask)
    if fmt == "rgba":
        image = decode_image(source)
        if image.shape[:2] != mask.shape:
            raise ImageDecodeError(f"image decoded as {image.shape[:2]}, expected {mask.shape}")
        return encode_png(np.dstack([image, mask]))
    raise ValueError(f"unknown format {fmt!r}")


def write_batch(batch: dict[str, np.ndarray], *, fmt: str, threshold: float) -> dict[str, np.ndarray]:
    """Stage 3: writes each pending row's output atomically; returns the manifest columns."""
    status = np.array(batch["status"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    seconds = np.array(batch["seconds"], dtype=np.float64)
    for i in np.flatnonzero(status == PENDING):
        start = time.perf_counter()
        try:
            png = render_output(batch["prob"][i], int(batch["height"][i]), int(batch["width"][i]),
                                fmt=fmt, threshold=threshold, source=batch["data"][i])
            storage.write_bytes(str(batch["output"][i]), png)
            status[i] = WRITTEN
        except Exception as exc:  # a failed PUT or encode is this input's failure only
            status[i], error[i] = FAILED, printable(f"cannot write: {exc}")
        seconds[i] += time.perf_counter() - start
    return {"input": batch["input"], "output": batch["output"], "width": batch["width"],
            "height": batch["height"], "status": status, "error": error, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Manifest and progress on the driver


class ManifestWriter:
    """Collects manifest rows and writes them as Parquet parts ``_manifest/part-<run>-NNNN.parquet``.

    Parts are flushed every ``rows_per_part`` rows, so the driver's memory stays bounded and a
    killed run keeps the parts it flushed; the run id in the name means no run overwrites another's.
    """

    def __init__(self, output_root: str, run_id: str, *, rows_per_part: int = 100_000) -> None:
        self.folder = storage.join(output_root, MANIFEST_DIR)
        self.run_id, self.rows_per_part = run_id, rows_per_part
        self.columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
        self.counts = {WRITTEN: 0, SKIPPED: 0, FAILED: 0}
        self.parts: list[str] = []

    def add(self, batch: dict[str, Iterable]) -> None:
        """Adds rows given as columns (lists or arrays keyed by the manifest's column names)."""
        for name in MANIFEST_SCHEMA.names:
            if name != "run_id":
                self.columns[name].extend(_plain(v) for v in batch[name])
        self.columns["run_id"].extend([self.run_id] * len(batch["status"]))
        for value in batch["status"]:
            self.counts[str(value)] = self.counts.get(str(value), 0) + 1
        if len(self.columns["input"]) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        cols = self.columns
        cols["width"] = [v or None for v in cols["width"]]  # 0 = unknown (skipped, failed)
        cols["height"] = [v or None for v in cols["height"]]
        cols["error"] = [v or None for v in cols["error"]]
        cols["output"] = [v or None for v in cols["output"]]
        table = pa.table(cols, schema=MANIFEST_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        uri = storage.join(self.folder, f"part-{self.run_id}-{len(self.parts):04d}.parquet")
        storage.write_bytes(uri, sink.getvalue().to_pybytes())
        self.parts.append(uri)
        self.columns = {name: [] for name in MANIFEST_SCHEMA.names}

    def close(self) -> list[str]:
        if self.columns["input"] or not self.parts:
            self.flush()
        return self.parts


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_run_manifest(summary: InferSummary) -> pa.Table:
    """One run's manifest as a single table (all its parts)."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(uri))) for uri in summary.manifest]
    return pa.concat_tables(tables)


class Progress:
    """A one-line bar on a terminal; a log line every ``interval`` seconds otherwise."""

    def __init__(self, total: int | None, *, interval: float = 15.0, stream=None) -> None:
        self.total, self.interval = total, interval
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int, counts: dict[str, int]) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.tty and now - self.last < self.interval:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"{self.done}/{self.total}" if self.total else str(self.done)
        text = (f"{of} inputs: written {counts.get(WRITTEN, 0)}, skipped {counts.get(SKIPPED, 0)}, "
                f"failed {counts.get(FAILED, 0)} ({rate:.1f}/s)")
        if self.tty:
            filled = int(30 * self.done / self.total) if self.total else 0
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text}")
            self.stream.flush()
        else:
            logger.info("%s", text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
