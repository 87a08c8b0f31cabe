"""The search job's options: the search's own (``SearchConfig``) beside the training job's, which
are fixed for every trial when given (flags or ``--config``) and otherwise come from the space.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass

from basnet.config import add_options, check_options, from_dict, load_yaml, option
from basnet.train.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["SearchConfig", "NOT_SEARCH_OPTIONS", "build_search_parser", "parse_search_args"]

# Training options that mean nothing for a search (budgets replace them; evaluation is separate).
NOT_SEARCH_OPTIONS = ("num_workers", "min_workers", "gpu", "gpus_per_worker", "eval_data", "eval_out")


@dataclass
class SearchConfig:
    """How to search: the space, the budgets and the algorithms."""

    space: str | None = option(None, "YAML search space over training options (see configs/tune.yaml); "
                                   "default: configs/tune.yaml's space, or a 32/64 px space without "
                                   "ImageNet weights on the sample")
    num_samples: int = option(8, "trials to run (each grid point counts once per sample)", positive=True)
    max_concurrent_trials: int | None = option(None, "trials at a time (default: as many as the cluster fits)",
                                               positive=True)
    workers_per_trial: int = option(1, "training workers per trial", positive=True)
    gpus_per_worker: float | None = option(None, "0 (train on CPU), 1, or a fraction to share a GPU between "
                                                 "trials (default: 1 if the cluster has GPUs)", within=(0, 1))
    data_cpus_per_trial: float = option(1.0, "CPUs left free per trial for Ray Data's decoding", at_least=0)
    scheduler: str = option("asha", "asha (stop poor trials early on val MAE) or fifo (run every trial "
                                  "to the end)", choices=("asha", "fifo"))
    grace_period: int = option(1, "ASHA: epochs every trial runs before it can be stopped", positive=True)
    search_alg: str = option("random", "random, or optuna / hyperopt when that package is installed",
                           choices=("random", "optuna", "hyperopt"))

    def check(self) -> None:
        check_options(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_search_parser(description: str, *, suppress: bool = False) -> argparse.ArgumentParser:
    """The training job's options (less the ones budgets replace) plus the search's own."""
    parser = argparse.ArgumentParser(description=description, argument_default=None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS if suppress else None,
                        help="YAML file of training options (as jobs/train.py takes); they and the "
                             "flags are fixed for every trial and left out of the search space")
    train = parser.add_argument_group("training options (fixed for every trial)")
    add_options(train, TrainConfig, suppress=suppress, skip=NOT_SEARCH_OPTIONS)
    search = parser.add_argument_group("search options")
    add_options(search, SearchConfig, suppress=suppress)
    if not suppress:
        parser.set_defaults(name="basnet-tune")
    return parser


def _config_file_options(path: str) -> dict:
    data = load_yaml(path)
    from_dict(TrainConfig, data, source=path)  # refuses keys the training job does not know
    dropped = [k for k in NOT_SEARCH_OPTIONS if data.get(k) is not None]
    if dropped:
        logger.warning("%s: %s left out: a search sets them per trial", path, ", ".join(dropped))
    return {k: v for k, v in data.items() if k not in NOT_SEARCH_OPTIONS}


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
