"""Planning a bulk-masking run on the driver: everything that can fail on bad arguments is
checked here, before any Ray work (inputs, outputs, weights, a writable ``--output``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import torch
import yaml

from basnet import storage
from basnet.errors import UsageError
from basnet.infer.config import PUBLISHED_IMAGE_SIZE, InferConfig
from basnet.infer.inputs import WorkItem, assign_outputs, collect_inputs
from basnet.infer.naming import canonical
from basnet.transforms import IMAGE_SUFFIXES

__all__ = ["CONFIG_DIR", "InferPlan", "new_run_id", "save_config", "plan_inference"]

CONFIG_DIR = "_config"


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
