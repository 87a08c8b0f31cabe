"""Hyperparameter searches over the training job with Ray Tune.

Each trial is a small Tune function that builds the training job's ``TorchTrainer``
(:func:`basnet.train.ray_trainer.build_trainer`) for one sampled config and fits it; a
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

import dataclasses
import logging
from typing import Any

import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from basnet import storage
from basnet.config import load_yaml
from basnet.data.discovery import Split
from basnet.errors import UsageError
from basnet.train.config import TrainConfig, resolve_data
from basnet.train.ray_trainer import build_trainer
from basnet.tune.config import SearchConfig
from basnet.tune.results import METRIC, SearchOutcome, print_summary, trial_rows, write_outputs
from basnet.tune.sizing import size_trials
from basnet.tune.space import check_search_alg, check_space, space_dict, trial_config

logger = logging.getLogger(__name__)

__all__ = ["run_search", "experiment_uri"]


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
    check_search_alg(name, dims)
    if name == "random":
        # Tune's max_concurrent_trials only limits Searchers; random search takes its own limit.
        return ray.tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)
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




# The Tune function only waits on its training run: it reserves no CPU (a CPU held by it would be
# one Ray Data cannot use). Tune needs some resource per trial; a little memory is honest.
_TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}


def experiment_uri(base: TrainConfig) -> str:
    return storage.join(base.storage, base.name)


def _save_spec(exp: str, base: TrainConfig, search: SearchConfig, dims: dict) -> None:
    spec = {"train": base.to_dict(), "search": search.to_dict(), "space": space_dict(dims)}
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
    given = (base.to_dict(), search.to_dict(), space_dict(dims))
    kept = (saved[0].to_dict(), saved[1].to_dict(), space_dict(saved[2]))
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
            metric=METRIC, mode="min", num_samples=search.num_samples,
            search_alg=_search_alg(search.search_alg, sized.seed, dims, concurrent),
            scheduler=_scheduler(search, sized.epochs), trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(
            name=sized.name, storage_path=storage.filesystem(sized.storage)[1], storage_filesystem=fs,
            # A failed trial is recorded and the search goes on; resuming the search retries it.
            failure_config=ray.tune.FailureConfig(max_failures=0), verbose=1),
    )


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
    sized, concurrent = size_trials(base, search, ray.cluster_resources())
    if not resumed:
        _save_spec(exp, base, search, dims)
    logger.info("searching %s over %d training pairs, validating on %d (%s)", ", ".join(dims) or "nothing",
                len(split.train), len(split.val), split.val_source)
    _tuner(exp, sized, search, dims, split, concurrent, resumed).fit()
    # Read back from storage: every trial of the search, also those of an earlier start.
    analysis = ray.tune.ExperimentAnalysis(path, storage_filesystem=fs)
    keys = [k for k, (d, _) in dims.items() if d != "fixed"]
    outcome = SearchOutcome(experiment=exp, keys=keys,
                            rows=trial_rows(analysis, keys, base.epochs))
    sampled = {t.trial_id: t.config for t in analysis.trials}
    fixed = {k: v[0] for k, (d, v) in dims.items() if d == "fixed"}
    best_sampled = {**fixed, **sampled[outcome.best["trial_id"]]} if outcome.best else None
    write_outputs(outcome, base, best_sampled)
    print_summary(outcome)
    return outcome
