"""Hyperparameter searches over the training job with Ray Tune.

Each trial is a small Tune function that builds the training job's ``TorchTrainer``
(:func:`basnet.ray_train.build_trainer`) for one sampled config and fits it; a
``TuneReportCallback`` forwards rank 0's per-epoch metrics and checkpoint path to Tune, where
ASHA stops poor trials after an epoch. A trial's training run is named after its trial id, so a
trial started again (after a crash, or when an interrupted search is resumed) continues from its
last checkpoint.

A search ``<storage>/<name>/`` holds::

    search.yaml            the base training config, search options and space of its first start
    <trial_id>/            Tune's record of each trial (result.json, progress.csv)
    runs/<trial_id>/       each trial's training run (epoch_NNNN checkpoints)
    trials.csv             one row per trial, best first
    best.yaml              the best trial's training config (``jobs/train.py --config best.yaml``)
    best_checkpoint.txt    the best trial's best checkpoint URI
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from basnet import storage
from basnet.cli import UsageError
from basnet.config import ConfigError, TrainConfig, from_dict, load_yaml
from basnet.data import Split
from basnet.ray_train import build_trainer, resolve_data

logger = logging.getLogger(__name__)

__all__ = [
    "SearchConfig", "SearchOutcome", "DEFAULT_SPACE", "SAMPLE_SPACE", "parse_search_args", "load_space",
    "check_space", "search_space", "check_search_alg", "trial_config", "size_trials", "run_search", "trial_rows",
    "format_table", "best_train_config",
]

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
# Training options that mean nothing for a search (budgets replace them; evaluation is separate).
_NOT_SEARCH_OPTIONS = ("num_workers", "min_workers", "gpu", "gpus_per_worker", "eval_data", "eval_out")
_MULTIPLES_OF_32 = ("image_size", "crop_size")
_METRIC = "val_mae"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class SearchConfig:
    """How to search: the space, the budgets and the algorithms."""

    space: str | None = _opt(None, "YAML search space over training options (see configs/tune.yaml); "
                                   "default: configs/tune.yaml's space, or a 32/64 px space without "
                                   "ImageNet weights on the sample")
    num_samples: int = _opt(8, "trials to run (each grid point counts once per sample)")
    max_concurrent_trials: int | None = _opt(None, "trials at a time (default: as many as the cluster fits)")
    workers_per_trial: int = _opt(1, "training workers per trial")
    gpus_per_worker: float | None = _opt(None, "0 (train on CPU), 1, or a fraction to share a GPU between "
                                               "trials (default: 1 if the cluster has GPUs)")
    data_cpus_per_trial: float = _opt(1.0, "CPUs left free per trial for Ray Data's decoding")
    scheduler: str = _opt("asha", "asha (stop poor trials early on val MAE) or fifo (run every trial "
                                  "to the end)", choices=("asha", "fifo"))
    grace_period: int = _opt(1, "ASHA: epochs every trial runs before it can be stopped")
    search_alg: str = _opt("random", "random, or optuna / hyperopt when that package is installed",
                           choices=("random", "optuna", "hyperopt"))

    def check(self) -> None:
        positive = {"num_samples": self.num_samples, "workers_per_trial": self.workers_per_trial,
                    "grace_period": self.grace_period, "max_concurrent_trials": self.max_concurrent_trials}
        for key, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {value}")
        if self.gpus_per_worker is not None and not 0 <= self.gpus_per_worker <= 1:
            raise ConfigError(f"--gpus-per-worker must be 0 (CPU), 1 or a fraction between, got "
                              f"{self.gpus_per_worker:g}")
        if self.data_cpus_per_trial < 0:
            raise ConfigError("--data-cpus-per-trial must be 0 or more")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- options


def _option_types(cls: type) -> dict[str, type]:
    """Each field's type with ``Optional`` removed (``int | None`` -> ``int``)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        out[name] = args[0] if union and len(args) == 1 else hint
    return out


def _add_options(parser: argparse.ArgumentParser, cls: type, *, suppress: bool, skip: tuple = ()) -> None:
    kinds = _option_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = argparse.SUPPRESS if suppress else f.default
        extra = {k: v for k, v in f.metadata.items() if k in ("choices", "metavar")}
        if kinds[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=f.metadata.get("help", ""))
        else:
            parser.add_argument(flag, dest=f.name, type=kinds[f.name], default=default,
                                help=f.metadata.get("help", ""), **extra)


def build_search_parser(description: str, *, suppress: bool = False) -> argparse.ArgumentParser:
    """The training job's options (less the ones budgets replace) plus the search's own."""
    parser = argparse.ArgumentParser(description=description, argument_default=None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS if suppress else None,
                        help="YAML file of training options (as jobs/train.py takes); they and the "
                             "flags are fixed for every trial and left out of the search space")
    train = parser.add_argument_group("training options (fixed for every trial)")
    _add_options(train, TrainConfig, suppress=suppress, skip=_NOT_SEARCH_OPTIONS)
    search = parser.add_argument_group("search options")
    _add_options(search, SearchConfig, suppress=suppress)
    if not suppress:
        parser.set_defaults(name="basnet-tune")
    return parser


def _config_file_options(path: str) -> dict:
    data = load_yaml(path)
    from_dict(TrainConfig, data, source=path)  # refuses keys the training job does not know
    dropped = [k for k in _NOT_SEARCH_OPTIONS if data.get(k) is not None]
    if dropped:
        logger.warning("%s: %s left out: a search sets them per trial", path, ", ".join(dropped))
    return {k: v for k, v in data.items() if k not in _NOT_SEARCH_OPTIONS}


def parse_search_args(argv: list[str] | None, description: str) -> tuple[TrainConfig, SearchConfig, set[str]]:
    """Parses the command line into the base training config, the search options and the set of
    training options given explicitly (flags or ``--config``), which stay fixed.

    The base config is resolved, except that ``crop_size`` stays ``None`` (following each trial's
    ``image_size``) unless given.
    """
    explicit = set(vars(build_search_parser(description, suppress=True).parse_args(argv)))
    parser = build_search_parser(description)
    pre, _ = parser.parse_known_args(argv)
    from_file = _config_file_options(pre.config) if pre.config else {}
    parser.set_defaults(**from_file)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    search = SearchConfig(**{f.name: args.pop(f.name) for f in dataclasses.fields(SearchConfig)})
    search.check()
    fixed = (explicit | {k for k, v in from_file.items() if v is not None}) & set(args)
    base = TrainConfig(**args).resolved()
    if "crop_size" not in fixed:
        base.crop_size = None
    return base, search, fixed


# ---------------------------------------------------------------- the search space


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
    searchable = known - set(_SET_PER_TRIAL) - set(_SET_BY_BUDGET) - set(_NOT_SEARCH_OPTIONS)
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
    if dist == "randint" and (kind is not int or key in _MULTIPLES_OF_32):
        what = "multiples of 32" if key in _MULTIPLES_OF_32 else "not whole numbers"
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
    kinds = _option_types(TrainConfig)
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


def _domain(dist: str, values: list) -> Any:
    if dist == "choice":
        return ray.tune.choice(values)
    if dist == "grid":
        return ray.tune.grid_search(values)
    if dist == "uniform":
        return ray.tune.uniform(*values)
    if dist == "loguniform":
        return ray.tune.loguniform(*values)
    return ray.tune.randint(values[0], values[1] + 1)  # inclusive in the YAML, exclusive in Tune


def _param_space(dims: dict[str, tuple[str, list]]) -> tuple[dict, dict]:
    """(Tune param space of the searched keys, fixed values) from the checked dimensions."""
    fixed = {k: v[0] for k, (d, v) in dims.items() if d == "fixed"}
    return {k: _domain(d, v) for k, (d, v) in dims.items() if d != "fixed"}, fixed


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) as Python numbers, so configs dump to YAML."""
    return value.item() if hasattr(value, "item") else value


def _resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg.resolved()``, with a ``crop_size`` left ``None`` following ``image_size``.

    The crop is derived here because ``resolved()`` on the sample fills a fixed 64 px crop,
    which a trial at 32 px cannot take.
    """
    if cfg.crop_size is None and cfg.image_size is not None:
        cfg = dataclasses.replace(cfg, crop_size=max(32, round(cfg.image_size * 7 / 8 / 32) * 32))
    return cfg.resolved()


def trial_config(base: TrainConfig, sampled: dict, *, name: str, storage_uri: str) -> TrainConfig:
    """One trial's training config: the base with the sampled values, resolved.

    ``crop_size`` left ``None`` in the base follows the trial's ``image_size`` (7/8 of it,
    rounded to a multiple of 32, as the training job derives it).
    """
    values = {k: _plain(v) for k, v in sampled.items()}
    return _resolved(dataclasses.replace(base, **values, name=name, storage=storage_uri))


# ---------------------------------------------------------------- budgets


def size_trials(base: TrainConfig, search: SearchConfig) -> tuple[TrainConfig, int]:
    """Sizes each trial and the number that run at once, from what the cluster has.

    A trial needs its training workers plus CPUs left free for Ray Data (which decodes on plain
    CPUs outside the workers' reservation); the Tune function itself reserves no CPU. On CPU a
    worker takes 1 CPU (less when that would not fit); on GPU one GPU and 1 CPU.

    Returns:
        (base with ``num_workers``, ``cpus_per_worker`` and ``gpu`` set, trials at a time).

    Raises:
        UsageError: One trial does not fit in the cluster.
    """
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    gpu = bool(gpus > 0 if search.gpus_per_worker is None else search.gpus_per_worker)
    gpw = 1.0 if search.gpus_per_worker is None or not gpu else float(search.gpus_per_worker)
    workers, data_cpus = search.workers_per_trial, search.data_cpus_per_trial
    if gpu and gpus < workers * gpw:
        raise UsageError(f"a trial needs {workers * gpw:g} GPU(s) but the cluster has {gpus:g}: lower "
                         "--workers-per-trial or pass --gpus-per-worker 0")
    cpw = base.cpus_per_worker
    if cpw is None:  # 1 CPU per worker, or what is left once Ray Data has its share
        cpw = min(1.0, math.floor(4 * (cpus - data_cpus) / workers) / 4) if cpus > data_cpus else 0
    need = workers * cpw + data_cpus
    if cpw <= 0 or need > cpus + 1e-9:
        raise UsageError(f"a trial needs {workers} worker(s) x {cpw:g} CPU + {data_cpus:g} CPU for Ray Data "
                         f"but the cluster has {cpus:g} CPUs: lower --workers-per-trial, --cpus-per-worker "
                         "or --data-cpus-per-trial")
    fits = int(cpus // need)
    if gpu:
        fits = min(fits, int(gpus / (workers * gpw) + 1e-9))
    concurrent = search.max_concurrent_trials or max(1, fits)
    if concurrent > fits:
        logger.warning("--max-concurrent-trials %d but the cluster fits %d trial(s): the others wait, "
                       "and Ray Data may starve", concurrent, fits)
    sized = dataclasses.replace(base, num_workers=workers, min_workers=None, cpus_per_worker=cpw, gpu=gpu,
                                gpus_per_worker=gpw)
    logger.info("each trial: %d worker(s) x %g CPU%s + %g CPU for Ray Data; %d trial(s) at a time",
                workers, cpw, " + 1 GPU" if gpu else "", data_cpus, concurrent)
    return sized, concurrent


# ---------------------------------------------------------------- the trial


def _run_trial(config: dict, *, base: dict, split: Split, runs: str) -> None:
    """One Tune trial: the training job for the sampled ``config``, its run named after the trial
    id so that a restarted trial continues from its last checkpoint."""
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(TrainConfig(**base), config, name=trial_id, storage_uri=runs)
    build_trainer(cfg, split, callbacks=[TuneReportCallback()]).fit()


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _search_alg(name: str, seed: int, dims: dict, concurrent: int) -> Any:
    """The search algorithm, limited to ``concurrent`` trials at a time."""
    if name == "random":
        # Tune's max_concurrent_trials only limits Searchers; random search takes its own limit.
        return ray.tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)
    if any(d == "grid" for d, _ in dims.values()):
        raise ConfigError(f"--search-alg {name} cannot search a grid: use choice, or --search-alg random")
    package = {"optuna": "optuna", "hyperopt": "hyperopt"}[name]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--search-alg {name} needs the {package} package: pip install {package} "
                          "(or use --search-alg random)")
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=seed)
    return ray.tune.search.ConcurrencyLimiter(searcher, max_concurrent=concurrent)


def _scheduler(search: SearchConfig, epochs: int) -> Any:
    if search.scheduler == "fifo":
        return ray.tune.schedulers.FIFOScheduler()
    # Time in epochs, not Tune iterations: the untrained baseline is reported as epoch 0, and a
    # resumed run reports from its next epoch on.
    return ray.tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=epochs,
                                             grace_period=min(search.grace_period, epochs),
                                             stop_last_trials=False)


# ---------------------------------------------------------------- starting or resuming


# The Tune function only waits on its training run: it reserves no CPU (a CPU held by it would be
# one Ray Data cannot use). Tune needs some resource per trial; a little memory is honest.
_TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}


def experiment_uri(base: TrainConfig) -> str:
    return storage.join(base.storage, base.name)


def _space_dict(dims: dict[str, tuple[str, list]]) -> dict:
    return {k: (v[0] if d == "fixed" else {d: list(v)}) for k, (d, v) in dims.items()}


def _save_spec(exp: str, base: TrainConfig, search: SearchConfig, dims: dict) -> None:
    spec = {"train": base.to_dict(), "search": search.to_dict(), "space": _space_dict(dims)}
    text = "# the options of this search's first start; resuming it uses these\n"
    storage.write_bytes(storage.join(exp, "search.yaml"), (text + yaml.safe_dump(spec, sort_keys=False)).encode())


def _load_spec(exp: str) -> tuple[TrainConfig, SearchConfig, dict]:
    spec = load_yaml(storage.join(exp, "search.yaml"))
    base, search = TrainConfig(**spec["train"]), SearchConfig(**spec["search"])
    return base, search, check_space(spec["space"], base)


def _resume_spec(exp: str, base: TrainConfig, search: SearchConfig, dims: dict) -> tuple:
    """The saved options of an interrupted search; warns about the ones given differently now."""
    if not storage.exists(storage.join(exp, "search.yaml")):
        raise UsageError(f"{exp} holds a Tune experiment that is not a basnet search: choose another --name")
    saved = _load_spec(exp)
    given = (base.to_dict(), search.to_dict(), _space_dict(dims))
    kept = (saved[0].to_dict(), saved[1].to_dict(), _space_dict(saved[2]))
    differ = sorted(k for now, then in zip(given[:2], kept[:2]) for k in now if now[k] != then[k])
    differ += ["search space"] if given[2] != kept[2] else []
    print(f"resuming the search in {exp}: finished trials are kept, unfinished ones continue "
          "from their last checkpoint", flush=True)
    if differ:
        logger.warning("resuming with the options of the search's first start; ignored now: %s",
                       ", ".join(differ))
    return saved


def _tuner(exp: str, sized: TrainConfig, search: SearchConfig, dims: dict, split: Split,
           concurrent: int, resumed: bool) -> ray.tune.Tuner:
    params, fixed = _param_space(dims)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_run_trial, base=dataclasses.replace(sized, **fixed).to_dict(), split=split,
                                 runs=storage.join(exp, "runs")),
        _TRIAL_DRIVER_RESOURCES)
    fs, path = storage.filesystem(exp)
    if resumed:
        # Finished trials stay finished; unfinished and errored ones start again, and their
        # training runs (named after the trial ids) continue from their last checkpoints.
        return ray.tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=fs)
    return ray.tune.Tuner(
        trainable, param_space=params,
        tune_config=ray.tune.TuneConfig(
            metric=_METRIC, mode="min", num_samples=search.num_samples,
            search_alg=_search_alg(search.search_alg, sized.seed, dims, concurrent),
            scheduler=_scheduler(search, sized.epochs), trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(
            name=sized.name, storage_path=storage.filesystem(sized.storage)[1], storage_filesystem=fs,
            # A failed trial is recorded and the search goes on; resuming the search retries it.
            failure_config=ray.tune.FailureConfig(max_failures=0), verbose=1),
    )


# ---------------------------------------------------------------- results


@dataclass
class SearchOutcome:
    """What a search leaves: the trials table (best first) and the best trial's files."""

    experiment: str
    keys: list[str]
    rows: list[dict]
    best_config: str | None = None
    best_checkpoint: str | None = None

    @property
    def best(self) -> dict | None:
        return self.rows[0] if self.rows and self.rows[0]["checkpoint"] else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _trial_row(trial: Any, reports: list[dict], keys: list[str], epochs: int, s3: bool) -> dict:
    """One trial: its sampled values, best checkpointed epoch, epochs run and status."""
    scored = [r for r in reports if isinstance(r.get("checkpoint_path"), str) and _finite(r.get(_METRIC))]
    best = min(scored, key=lambda r: r[_METRIC]) if scored else {}
    epochs_run = max((int(r["epoch"]) for r in reports if _finite(r.get("epoch"))), default=0)
    status = {"ERROR": "error", "TERMINATED": "done" if epochs_run >= epochs else "stopped"}.get(
        trial.status, trial.status.lower())
    checkpoint = best.get("checkpoint_path")
    return {
        "trial_id": trial.trial_id,
        **{k: _plain(trial.config.get(k)) for k in keys},
        "val_mae": best.get(_METRIC), "val_max_f": best.get("val_max_f"),
        "best_epoch": int(best["epoch"]) if best else None, "epochs_run": epochs_run, "status": status,
        "checkpoint": ("s3://" + checkpoint if s3 else checkpoint) if checkpoint else None,
    }


def trial_rows(analysis: Any, keys: list[str], epochs: int, *, s3: bool = False) -> list[dict]:
    """Rows of the trials table from a Tune ``ExperimentAnalysis``, best validation MAE first.

    "stopped" is a trial the scheduler ended before ``epochs``; "error" one that failed.
    """
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        rows.append(_trial_row(trial, frame.to_dict("records") if frame is not None else [], keys, epochs, s3))
    return sorted(rows, key=lambda r: (not _finite(r["val_mae"]), r["val_mae"] or 0.0, r["trial_id"]))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 0.01 <= abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict], keys: list[str]) -> str:
    """The trials table as fixed-width text (checkpoint URIs are in the CSV)."""
    columns = ["trial_id", *keys, "val_mae", "val_max_f", "epochs_run", "status"]
    cells = [columns] + [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def best_train_config(base: TrainConfig, sampled: dict, *, name: str) -> dict:
    """The best trial's training config for ``jobs/train.py --config``: its values, a new run
    name in the search's storage, and resources left for the training job to size."""
    cfg = trial_config(base, sampled, name=name, storage_uri=base.storage)
    return {**cfg.to_dict(), "num_workers": None, "min_workers": None, "cpus_per_worker": None, "gpu": None,
            "gpus_per_worker": 1.0}


def write_outputs(outcome: SearchOutcome, base: TrainConfig, best_sampled: dict | None) -> None:
    """Writes trials.csv, and for the best trial best.yaml and best_checkpoint.txt."""
    storage.write_bytes(storage.join(outcome.experiment, "trials.csv"), _csv(outcome.rows))
    best = outcome.best
    if best is None or best_sampled is None:
        return
    config = best_train_config(base, best_sampled, name=f"{base.name}-best")
    outcome.best_config = storage.join(outcome.experiment, "best.yaml")
    header = (f"# best trial {best['trial_id']} of the search {outcome.experiment}: val MAE "
              f"{best['val_mae']:.4f}, val max F {best['val_max_f']:.4f} (epoch {best['best_epoch']})\n"
              f"# best checkpoint: {best['checkpoint']}\n"
              f"# train with it: python jobs/train.py --config {outcome.best_config} [--epochs N]\n")
    outcome.best_checkpoint = best["checkpoint"]
    storage.write_bytes(outcome.best_config, (header + yaml.safe_dump(config, sort_keys=False)).encode())
    storage.write_bytes(storage.join(outcome.experiment, "best_checkpoint.txt"), f"{best['checkpoint']}\n".encode())


# ---------------------------------------------------------------- the search


def check_search_alg(search: SearchConfig, dims: dict) -> None:
    """Refuses an unavailable search algorithm before anything starts."""
    _search_alg(search.search_alg, 0, dims, 1)


def run_search(base: TrainConfig, search: SearchConfig, dims: dict[str, tuple[str, list]]) -> SearchOutcome:
    """Runs (or resumes, same ``--name``) a search on the running Ray cluster.

    Prints the trials table and the best checkpoint; writes trials.csv, best.yaml and
    best_checkpoint.txt under ``<storage>/<name>/``.
    """
    exp = experiment_uri(base)
    fs, path = storage.filesystem(exp)
    resumed = ray.tune.Tuner.can_restore(path, storage_filesystem=fs)
    if resumed:
        base, search, dims = _resume_spec(exp, base, search, dims)
    split = resolve_data(base)
    sized, concurrent = size_trials(base, search)
    if not resumed:
        _save_spec(exp, base, search, dims)
    logger.info("searching %s over %d training pairs, validating on %d (%s)", ", ".join(dims) or "nothing",
                len(split.train), len(split.val), split.val_source)
    _tuner(exp, sized, search, dims, split, concurrent, resumed).fit()
    # Read back from storage: every trial of the search, also those of an earlier start.
    analysis = ray.tune.ExperimentAnalysis(path, storage_filesystem=fs)
    keys = [k for k, (d, _) in dims.items() if d != "fixed"]
    outcome = SearchOutcome(experiment=exp, keys=keys,
                            rows=trial_rows(analysis, keys, base.epochs, s3=storage.is_s3(exp)))
    sampled = {t.trial_id: t.config for t in analysis.trials}
    fixed = {k: v[0] for k, (d, v) in dims.items() if d == "fixed"}
    best_sampled = {**fixed, **sampled[outcome.best["trial_id"]]} if outcome.best else None
    write_outputs(outcome, base, best_sampled)
    _print_summary(outcome)
    return outcome


def _print_summary(outcome: SearchOutcome) -> None:
    print(format_table(outcome.rows, outcome.keys), flush=True)
    print(f"trials table: {storage.join(outcome.experiment, 'trials.csv')}", flush=True)
    if outcome.best_config:
        print(f"best trial: {outcome.best['trial_id']}  val MAE {outcome.best['val_mae']:.4f}  "
              f"val max F {outcome.best['val_max_f']:.4f}", flush=True)
        print(f"best checkpoint: {outcome.best_checkpoint}", flush=True)
        print(f"best config: {outcome.best_config}", flush=True)
    if any(row["status"] not in ("done", "stopped", "error") for row in outcome.rows):
        print("the search was interrupted: run the same command again to finish it", flush=True)
