"""The search space: a YAML file mapping training options to distributions, checked against the
training options before any trial starts (configs/tune.yaml documents the language).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Any

from basnet import storage
from basnet.config import default_crop, load_yaml, option_type, plain
from basnet.errors import ConfigError
from basnet.train.config import TrainConfig
from basnet.tune.config import NOT_SEARCH_OPTIONS, SearchConfig

logger = logging.getLogger(__name__)

__all__ = ["DISTRIBUTIONS", "DEFAULT_SPACE", "SAMPLE_SPACE", "load_space", "check_space", "search_space",
           "space_dict", "trial_config", "check_search_alg"]

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")

# The default search space for DUTS-like data (configs/tune.yaml documents the same space).
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"loguniform": [3e-5, 3e-3]},
    "batch_size": {"choice": [4, 8, 16]},
    "image_size": {"choice": [224, 256, 288, 320]},
    "bce_weight": {"uniform": [0.5, 1.5]},
    "ssim_weight": {"uniform": [0.5, 1.5]},
    "iou_weight": {"uniform": [0.5, 1.5]},
    "weight_decay": {"choice": [0.0, 1e-5, 1e-4]},
    "backbone_weights": {"choice": ["imagenet", "none"]},
}
# On the embedded sample (no --data): small images, and no ImageNet weights, which would need a
# download that machines without internet cannot do.
SAMPLE_SPACE: dict[str, Any] = {
    **{k: v for k, v in DEFAULT_SPACE.items() if k != "backbone_weights"},
    "batch_size": {"choice": [4, 8]},
    "image_size": {"choice": [32, 64]},
}

# Options each trial gets from the search itself, never from the space.
_SET_PER_TRIAL = {"name": "each trial's run is named after its trial id",
                  "storage": "trials write under <storage>/<name>/runs"}
_SET_BY_BUDGET = {"num_workers": "--workers-per-trial", "min_workers": "--workers-per-trial",
                  "cpus_per_worker": "--cpus-per-worker", "gpu": "--gpus-per-worker",
                  "gpus_per_worker": "--gpus-per-worker"}
# Options whose values must be multiples of 32, as TrainConfig declares them.
MULTIPLES_OF_32 = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("multiple_of") == 32)


def load_space(path: str) -> dict[str, Any]:
    """Reads a YAML search space (``key: {distribution: args}`` or ``key: value``)."""
    if not storage.exists(path):
        raise ConfigError(f"search space file not found: {path} (see configs/tune.yaml for an example)")
    return load_yaml(path)


def _coerce(key: str, value: Any, kind: type) -> Any:
    """A YAML value as the option's type (YAML 1.1 reads ``1e-4`` as a string)."""
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
    elif kind is str and isinstance(value, str):
        return value
    elif kind is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"search space: {key}: {value!r} is not a valid {kind.__name__}")


def _check_key(key: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    searchable = known - set(_SET_PER_TRIAL) - set(_SET_BY_BUDGET) - set(NOT_SEARCH_OPTIONS)
    if key not in known:
        raise ConfigError(f"search space key {key!r} is not a training option: known options are "
                          f"{', '.join(sorted(searchable))}")
    if key in _SET_PER_TRIAL:
        raise ConfigError(f"search space key {key!r} cannot be searched: {_SET_PER_TRIAL[key]}")
    if key in _SET_BY_BUDGET:
        raise ConfigError(f"search space key {key!r} cannot be searched: set it with {_SET_BY_BUDGET[key]}")
    if key not in searchable:
        raise ConfigError(f"search space key {key!r} cannot be searched: evaluate the best checkpoint "
                          "with jobs/evaluate.py after the search")


def _parse_dimension(key: str, spec: Any, kind: type) -> tuple[str, list]:
    """``{distribution: args}`` -> (distribution, coerced args); a plain value -> ("fixed", [value])."""
    if not isinstance(spec, dict):
        return "fixed", [_coerce(key, spec, kind) if spec is not None else None]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"search space: {key}: {spec!r} is not a distribution: use one of "
                          f"{', '.join(DISTRIBUTIONS)} (e.g. {{choice: [4, 8]}}) or a fixed value")
    dist, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search space: {key}: {dist} needs a list of values, e.g. {{{dist}: [1, 2]}}")
    args = [_coerce(key, a, kind) for a in args]
    if dist in ("uniform", "loguniform", "randint"):
        _check_range(key, dist, args, kind)
    return dist, args


def _check_range(key: str, dist: str, args: list, kind: type) -> None:
    if len(args) != 2 or not args[0] < args[1]:
        raise ConfigError(f"search space: {key}: {dist} needs [low, high] with low < high, got {args}")
    if dist == "loguniform" and args[0] <= 0:
        raise ConfigError(f"search space: {key}: loguniform needs a positive low bound, got {args[0]}")
    if dist in ("uniform", "loguniform") and kind is not float:
        raise ConfigError(f"search space: {key} takes whole values: use choice or randint, not {dist}")
    if dist == "randint" and (kind is not int or key in MULTIPLES_OF_32):
        what = "multiples of 32" if key in MULTIPLES_OF_32 else "not whole numbers"
        raise ConfigError(f"search space: {key} values are {what}: use choice")


def check_space(space: dict[str, Any], base: TrainConfig) -> dict[str, tuple[str, list]]:
    """Validates a search space against the training options, before any trial starts.

    Every key must be a training option a trial can vary; every listed value (and each range's
    bounds) must give a valid training config on top of ``base``.

    Returns:
        ``{key: (distribution, values)}`` with values coerced to the option's type.

    Raises:
        ConfigError: One line naming the key and the fix.
    """
    kinds = {f.name: option_type(TrainConfig, f) for f in dataclasses.fields(TrainConfig)}
    dims = {}
    for key, spec in space.items():
        _check_key(str(key))
        dims[key] = _parse_dimension(key, spec, kinds[key])
        for value in dims[key][1]:
            try:
                _resolved(dataclasses.replace(base, **{key: value}))
            except ConfigError as exc:
                raise ConfigError(f"search space: {key}: {value!r}: {exc}") from None
    return dims


def search_space(search: SearchConfig, base: TrainConfig, fixed: set[str]) -> dict[str, tuple[str, list]]:
    """The space to search: ``--space`` or the default, less the options fixed by flags."""
    if search.space:
        space = load_space(search.space)
    else:
        space = dict(SAMPLE_SPACE if base.data is None else DEFAULT_SPACE)
    dims = check_space(space, base)
    for key in sorted(fixed & set(dims)):
        logger.info("%s is fixed at %r by the command line: not searched", key, getattr(base, key))
        del dims[key]
    if base.data is None and "imagenet" in dims.get("backbone_weights", ("", []))[1]:
        logger.warning("backbone_weights imagenet downloads weights: such trials fail without internet")
    return dims


def _resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg.resolved()``, with a ``crop_size`` left ``None`` following ``image_size``.

    The crop is derived here because ``resolved()`` on the sample fills a fixed 64 px crop,
    which a trial at 32 px cannot take.
    """
    if cfg.crop_size is None and cfg.image_size is not None:
        cfg = dataclasses.replace(cfg, crop_size=default_crop(cfg.image_size))
    return cfg.resolved()


def trial_config(base: TrainConfig, sampled: dict, *, name: str, storage_uri: str) -> TrainConfig:
    """One trial's training config: the base with the sampled values, resolved.

    ``crop_size`` left ``None`` in the base follows the trial's ``image_size`` (7/8 of it,
    rounded to a multiple of 32, as the training job derives it).
    """
    values = {k: plain(v) for k, v in sampled.items()}
    return _resolved(dataclasses.replace(base, **values, name=name, storage=storage_uri))


def space_dict(dims: dict[str, tuple[str, list]]) -> dict:
    """Checked dimensions back in the YAML language (``search.yaml`` saves them so)."""
    return {k: (v[0] if d == "fixed" else {d: list(v)}) for k, (d, v) in dims.items()}


def check_search_alg(name: str, dims: dict[str, tuple[str, list]]) -> None:
    """Refuses, before anything starts, a search algorithm that is not installed or cannot search
    the space (only random search walks a grid)."""
    if name == "random":
        return
    if any(d == "grid" for d, _ in dims.values()):
        raise ConfigError(f"--search-alg {name} cannot search a grid: use choice, or --search-alg random")
    if importlib.util.find_spec(name) is None:  # the packages are named as the algorithms
        raise ConfigError(f"--search-alg {name} needs the {name} package: pip install {name} "
                          "(or use --search-alg random)")
