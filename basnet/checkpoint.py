"""Training checkpoints and published weights, on local disk or S3.

A training checkpoint is a directory holding ``model.pt`` and ``config.yaml``.
``model.pt`` is ``torch.save`` of ``{"format": "basnet-ray/1", "model",
"optimizer", "scaler", "epoch", "metrics", "config"}``; ``config.yaml`` is the
resolved training config alone, so it can be passed back to training as is.
The published ``basnet.pth`` (a bare state dict in the original's layout,
possibly with DataParallel's ``module.`` prefix) loads through the same calls.
Everything is read with ``weights_only=True``: a checkpoint never runs code.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from typing import Any

import torch
import yaml

from basnet import storage
from basnet.config import PUBLISHED_IMAGE_SIZE, plain
from basnet.errors import CheckpointError, first_line  # noqa: F401 (CheckpointError: callers import it from here)
from basnet.model import BASNet

logger = logging.getLogger(__name__)

FORMAT = "basnet-ray/1"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
# Prefixes added by DataParallel / DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(
    directory: str,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    epoch: int,
    metrics: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    scaler_state: dict[str, Any] | None = None,
) -> str:
    """Write ``model.pt`` and ``config.yaml`` into ``directory`` (local path or ``s3://``).

    Args:
        directory: Checkpoint directory; created if needed.
        model_state: The model's state dict; wrapper prefixes are stripped and
            tensors moved to CPU so it loads anywhere, wrapped or not.
        config: The resolved training config (plain types only).
        epoch: Epochs completed.
        metrics: Metrics of that epoch.
        optimizer_state: ``optimizer.state_dict()``, for resuming.
        scaler_state: ``GradScaler.state_dict()``, for resuming mixed precision.

    Returns:
        ``directory``.
    """
    config, metrics = plain(config), plain(metrics)
    payload = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in strip_prefixes(model_state).items()},
        "optimizer": _to_cpu(optimizer_state),
        "scaler": scaler_state,
        "epoch": int(epoch),
        "metrics": metrics,
        "config": config,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    # The epoch and metrics go in a comment: config.yaml stays a plain training config.
    summary = yaml.safe_dump(metrics, default_flow_style=True, width=1 << 16).strip()
    text = f"# basnet-ray checkpoint: epoch {int(epoch)}, metrics {summary}\n"
    text += yaml.safe_dump(config, sort_keys=False)
    # config.yaml first: a directory that has model.pt is complete.
    storage.write_bytes(storage.join(directory, CONFIG_FILE), text.encode())
    storage.write_bytes(storage.join(directory, MODEL_FILE), buffer.getvalue())
    logger.debug("saved checkpoint of epoch %d to %s", epoch, directory)
    return directory


def load_checkpoint(source: str, *, map_location: Any = "cpu", whole: bool = False) -> dict[str, Any]:
    """Read a training checkpoint or a bare state dict.

    Args:
        source: A checkpoint directory (local or ``s3://``), the ``model.pt``
            inside one, or a state dict file such as the published ``basnet.pth``.
        map_location: Passed to ``torch.load``.
        whole: Every tensor will be used (a resume): an S3 checkpoint is loaded from memory
            instead of being mapped from a temporary file, which would only add a disk write.

    Returns:
        A dict with ``format``, ``model`` (state dict without wrapper prefixes),
        ``optimizer``, ``scaler``, ``epoch``, ``metrics`` and ``config``; for a
        bare state dict ``format`` is ``"state_dict"`` and the others are None.

    Raises:
        CheckpointError: The source is missing, not a torch file, or holds
            something other than a checkpoint or a state dict.
    """
    obj = _torch_load(_model_file(source), map_location, whole=whole)
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != FORMAT:
            raise CheckpointError(
                f"{source}: unsupported checkpoint format {obj['format']!r} (expected {FORMAT!r})"
            )
        return {**obj, "model": strip_prefixes(obj["model"])}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        empty = dict.fromkeys(("optimizer", "scaler", "epoch", "metrics", "config"))
        return {**empty, "format": "state_dict", "model": strip_prefixes(obj)}
    raise CheckpointError(
        f"{source} holds a {type(obj).__name__}, neither a basnet-ray checkpoint nor a state dict"
    )


def load_model(source: str, *, map_location: Any = "cpu") -> BASNet:
    """Build a ``BASNet`` from a checkpoint or published weights, in eval mode.

    Args:
        source: See ``load_checkpoint``.
        map_location: Passed to ``torch.load``; a device string or
            ``torch.device`` also receives the model.

    Raises:
        CheckpointError: The source cannot be read or its keys or shapes are
            not BASNet's (strict loading).
    """
    return _build_model(load_checkpoint(source, map_location=map_location)["model"], source, map_location)


def load_for_inference(source: str, image_size: int | None = None) -> tuple[BASNet, int]:
    """The model (on the CPU, eval mode) and the side masks are predicted at, from one read of the
    weights: ``image_size`` if given, else the checkpoint's training size (``PUBLISHED_IMAGE_SIZE``
    for published weights, which carry no config).

    Raises:
        CheckpointError: As :func:`load_model`.
    """
    payload = load_checkpoint(source)
    trained = payload["config"] or {}
    size = int(image_size or trained.get("image_size") or PUBLISHED_IMAGE_SIZE)
    return _build_model(payload["model"], source, "cpu"), size


def _build_model(state: dict[str, torch.Tensor], source: str, map_location: Any) -> BASNet:
    """A BASNet holding ``state``, refused unless its keys and shapes are BASNet's (strict). The
    model is built on the meta device and given empty memory that the weights are copied into: no
    random init of 87 M parameters that are overwritten next, and no tensor left backed by the
    memory-mapped file (which a later save could replace under it)."""
    with torch.device("meta"):
        model = BASNet()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(
            f"{source} is not a BASNet state dict: {len(missing)} missing and "
            f"{len(unexpected)} unexpected keys (first: {example!r})"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(
            f"{source} is not a BASNet state dict: {len(wrong)} shapes differ (first: {wrong[0]!r})"
        )
    model.to_empty(device="cpu").load_state_dict(state, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def restore_training_state(payload: dict[str, Any], module: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None = None,
                           scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict]:
    """Load a checkpoint's model, optimizer and scaler state into live objects.

    Call it once the model is on its device and the optimizer is built on those parameters:
    ``Optimizer.load_state_dict`` then casts the saved state to each parameter's device.

    Args:
        payload: What :func:`load_checkpoint` returned.
        module: The bare model (not a DDP or compile wrapper).
        optimizer: The optimizer to restore, if any.
        scaler: The GradScaler to restore, if any.

    Returns:
        ``(epochs done, metrics of that epoch)``.
    """
    module.load_state_dict(payload["model"])
    if optimizer is not None and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    return int(payload.get("epoch") or 0), dict(payload.get("metrics") or {})


def checkpoint_config(source: str) -> dict[str, Any] | None:
    """Return the training config stored with a checkpoint, or None for published weights.

    A checkpoint directory's ``config.yaml`` is read without touching the
    (350 MB) weights; other sources fall back to ``load_checkpoint``.
    """
    config_uri = storage.join(source, CONFIG_FILE)
    if _is_dir(source) and storage.exists(config_uri):
        config = yaml.safe_load(storage.read_bytes(config_uri))
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_uri} does not hold a mapping")
        return config
    return load_checkpoint(source)["config"]


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes that model wrappers add to keys."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _is_dir(source: str) -> bool:
    try:
        return storage.is_dir(source)
    except (OSError, ValueError):  # e.g. an unreachable S3 endpoint or an unknown scheme
        return False


def _model_file(source: str) -> str:
    """Resolve ``source`` to the file to read: ``<dir>/model.pt`` or the file itself."""
    source = str(source)
    if _is_dir(source):
        return storage.join(source, MODEL_FILE)
    return source


@contextlib.contextmanager
def _torch_source(uri: str, *, whole: bool):
    """What ``torch.load`` reads for ``uri``: a local file's path; an S3 object downloaded to a
    temporary file (deleted afterwards) to be mapped, or with ``whole`` its bytes in memory. The
    download is one read: ranged reads of 16 MB took 54 s for 1 GB from an S3-compatible server
    (moto) that serves it in 2 s whole."""
    _, path = storage.filesystem(uri)
    if not storage.is_s3(uri):
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        yield path
        return
    if whole:
        yield io.BytesIO(storage.read_bytes(uri))
        return
    with tempfile.NamedTemporaryFile(prefix="basnet-checkpoint-", suffix=".pt") as tmp:
        tmp.write(storage.read_bytes(uri))
        tmp.flush()
        yield tmp.name


def _torch_load(uri: str, map_location: Any, *, whole: bool = False) -> Any:
    """``torch.load`` of a local or S3 file, errors as CheckpointError.

    A file is memory-mapped (``mmap=True``): a tensor's pages are read when it is used, so taking
    the model out of a training checkpoint never reads its optimizer state (two thirds of its 1 GB).
    Files in torch's legacy format, which cannot be mapped, are read whole.
    """
    hint = "pass a training checkpoint directory or a basnet.pth file"
    try:
        with _torch_source(uri, whole=whole) as source:
            try:
                return _load(source, map_location)
            except Exception as error:  # torch.load raises several types for non-torch bytes
                raise CheckpointError(f"{uri} is not a readable torch file ({hint}): {first_line(error)}") from None
    except CheckpointError:
        raise
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"checkpoint not found: {uri} ({hint})") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {uri}: {first_line(error)}") from None


def _load(source: str | io.BytesIO, map_location: Any) -> Any:
    """``torch.load``, memory-mapped when ``source`` is a path in a format that can be mapped."""
    if isinstance(source, str):
        try:
            return torch.load(source, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
    return torch.load(source, map_location=map_location, weights_only=True)


def _to_cpu(value: Any) -> Any:
    """The same nested structure with every tensor on the CPU, so a checkpoint loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
