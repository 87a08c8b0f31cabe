"""Planning a bulk-masking run on the driver: every check that can fail on bad arguments, cheaply.

The driver never lists the input and never loads the weights (``basnet.infer.ray_pipeline`` does
both in Ray tasks): it checks that ``--input`` is what it claims to be, that ``--weights`` exists
and starts as a torch file or is a ``.onnx``, and that ``--output`` is writable (by saving the
run's config there), so a bad argument still fails in one line before any Ray work, and a
million-image run starts in the same second as a ten-image one. No torch here: the driver stays
small.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import yaml

from basnet import storage
from basnet.errors import JobFailed, UsageError, first_line
from basnet.infer.config import InferConfig, is_onnx
from basnet.infer.inputs import InputSpec, discover_units, image_units, resolve_input
from basnet.infer.monitor import storage_failure
from basnet.infer.naming import canonical

__all__ = ["CONFIG_DIR", "InferPlan", "find_units", "new_run_id", "save_config", "plan_inference"]

CONFIG_DIR = "_config"
MODEL_FILE = "model.pt"  # a training checkpoint folder's weights (basnet.checkpoint, which imports torch)
# What torch.save writes: a zip archive, or in its legacy format a pickle stream (protocol 2 or later).
_TORCH_HEADERS = (b"PK\x03\x04", b"\x80")
_WEIGHTS_HINT = "pass a training checkpoint directory, a basnet.pth file or a model.onnx"


@dataclass
class InferPlan:
    """What the driver decided before any Ray work."""

    config: InferConfig
    run_id: str
    output_root: str
    input: InputSpec
    config_uri: str
    units: list[dict] | None = None  # known listing units (an explicit image list); else found by a task

    def listing_options(self) -> dict:
        """``basnet.infer.listing.list_batch``'s options."""
        return {"root": self.input.root, "root_given": self.input.root_given or self.input.kind != "manifest",
                "output_root": self.output_root, "overwrite": self.config.overwrite,
                "suffix": self.config.output_suffix()}


def find_units(plan: InferPlan) -> list[dict]:
    """The plan's listing units (``basnet.infer.inputs``): known, or found now; storage that refuses
    the listing is the ``--input``'s failure (``storage_failure``)."""
    if plan.units is not None:
        return plan.units
    try:
        return discover_units(plan.input, plan.output_root)
    except OSError as exc:
        raise storage_failure("--input", plan.input.uri, exc) from None


def new_run_id() -> str:
    """Sortable by start time and unique, so a re-run never overwrites an earlier run's files."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def save_config(cfg: InferConfig, uri: str, run_id: str) -> None:
    """Writes the resolved config (loadable again with ``--config``) beside the outputs."""
    text = f"# basnet-ray bulk masking, run {run_id}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    storage.write_bytes(uri, text.encode())


def _check_weights(uri: str) -> None:
    """That the weights exist and, unless they are a ``.onnx``, that their first bytes are a torch
    file's (loading them is a Ray task's work; its errors come back as theirs). A text file or an
    image passed by mistake is refused here in a second instead of after Ray has started."""
    try:
        if not storage.exists(uri):  # a file or a checkpoint folder
            raise UsageError(f"checkpoint not found: {uri} ({_WEIGHTS_HINT})")
        if is_onnx(uri):
            return
        model = storage.join(uri, MODEL_FILE) if storage.is_dir(uri) else uri
        head = storage.read_head(model, 4)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {uri} has no {MODEL_FILE} ({_WEIGHTS_HINT})") from None
    except OSError as exc:
        raise storage_failure("--weights", uri, exc) from None
    if not head.startswith(_TORCH_HEADERS):
        raise UsageError(f"{uri} is not a readable torch file ({_WEIGHTS_HINT}): it is neither a zip archive "
                         "nor a pickle stream, the two formats torch.save writes")


def plan_inference(cfg: InferConfig, *, images: Sequence[str] | None = None) -> InferPlan:
    """Every check that can fail on bad arguments, before any Ray work and without listing.

    Args:
        cfg: The job's options.
        images: Explicit image URIs to mask instead of listing ``cfg.input``; their outputs mirror
            their paths relative to ``cfg.root`` (or ``cfg.input`` when ``root`` is unset).

    Raises:
        ConfigError, UsageError: Bad options, a missing input or weights, an unwritable output.
        JobFailed: Storage refused access to the input, the weights or the output.
    """
    cfg = dataclasses.replace(cfg, input=cfg.input or cfg.root)
    cfg.check()
    cfg = dataclasses.replace(cfg, runtime=cfg.resolved_runtime())
    output_root = canonical(cfg.output)
    spec = resolve_input(cfg, images)
    if images is not None and not images:
        raise UsageError("no images to mask")
    _check_weights(cfg.weights)
    run_id = new_run_id()
    config_uri = storage.join(output_root, CONFIG_DIR, f"config-{run_id}.yaml")
    if not cfg.dry_run:
        try:
            save_config(cfg, config_uri, run_id)  # doubles as the check that --output is writable
        except OSError as exc:
            failure = storage_failure("--output", cfg.output, exc)
            if isinstance(failure, JobFailed):
                raise failure from None
            raise UsageError(f"cannot write to --output {cfg.output}: {first_line(exc)}") from None
    units = image_units(images) if images is not None else None
    return InferPlan(cfg, run_id, output_root, spec, config_uri, units)
