"""Hyperparameter searches (jobs/tune.py, basnet/tune/) on a tiny sample at 32 px, CPU.

The Ray tests share one search: jobs/tune.py run as a subprocess (with its own local Ray), killed
part-way, started again, and left to finish. Its checkpoints are ~1 GB each, so the search is
small (2 trials of 1 epoch, one at a time: at the kill the first has finished and is kept, and the
second is still to run, or to run again when it had started; a resumed training run's continuing
from its checkpoint is tested in tests/train) and deleted at the end of the module. One at a time:
two trials sharing 2 CPUs were slower than in a row, and often finished together (the module took
143-161 s alone with 3 trials two at a time, 133 s with 2 in a row).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from basnet.config import parse_config
from basnet.errors import ConfigError, UsageError
from basnet.train.config import TrainConfig
from basnet.tune.config import SearchConfig, parse_search_args
from basnet.tune.sizing import size_trials
from basnet.tune.space import (
    DEFAULT_SPACE,
    SAMPLE_SPACE,
    check_search_alg,
    check_space,
    load_space,
    search_space,
    trial_config,
)

REPO = Path(__file__).resolve().parents[2]
SPACE = """
lr: {loguniform: [1e-4, 3.0e-3]}
batch_size: {choice: [4, 8]}
iou_weight: {uniform: [0.5, 1.5]}
"""


def write_space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- options and space (no Ray)


def test_configs_tune_yaml_is_the_default_space():
    base = TrainConfig(data="/data/DUTS").resolved()
    assert check_space(load_space(str(REPO / "configs" / "tune.yaml")), base) == check_space(DEFAULT_SPACE, base)


def test_default_space_on_the_sample_has_small_images_and_no_imagenet_weights():
    base, search, fixed = parse_search_args([], "t")
    dims = search_space(search, base, fixed)
    assert "backbone_weights" not in dims and "imagenet" not in str(SAMPLE_SPACE)
    assert dims["image_size"] == ("choice", [32, 64])
    assert base.backbone_weights == "none"


def test_space_values_are_typed_and_ranges_checked(tmp_path):
    base = TrainConfig(data="/d").resolved()
    dims = check_space(load_space(write_space(tmp_path, SPACE + "epochs: 4\n")), base)
    assert dims["lr"] == ("loguniform", [1e-4, 3e-3])  # YAML's string '1e-4' read as a float
    assert dims["batch_size"] == ("choice", [4, 8]) and dims["epochs"] == ("fixed", [4])


@pytest.mark.parametrize("space, message", [
    ({"epoch": {"choice": [1, 2]}}, "search space key 'epoch' is not a training option"),
    ({"num_workers": {"choice": [1, 2]}}, "set it with --workers-per-trial"),
    ({"name": {"choice": ["a"]}}, "cannot be searched"),
    ({"eval_data": {"choice": ["sample"]}}, "cannot be searched"),
    ({"image_size": {"choice": [256, 100]}}, "not a multiple of 32"),
    ({"image_size": {"randint": [224, 320]}}, "use choice"),
    ({"lr": {"loguniform": [0, 0.1]}}, "positive low bound"),
    ({"lr": {"between": [0.1, 0.2]}}, "is not a distribution"),
    ({"batch_size": {"choice": ["eight"]}}, "is not a valid int"),
])
def test_bad_space_is_refused_with_one_line(space, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_space(space, TrainConfig(data="/d").resolved())
    assert "\n" not in str(info.value)


def test_flags_fix_options_and_leave_them_out_of_the_space():
    base, search, fixed = parse_search_args(["--data", "/d", "--lr", "0.001", "--image-size", "64"], "t")
    dims = search_space(search, base, fixed)
    assert "lr" not in dims and "image_size" not in dims and "batch_size" in dims
    assert (base.lr, base.image_size, base.crop_size) == (0.001, 64, None)
    assert base.name == "basnet-tune"


def test_trial_crop_follows_its_sampled_image_size():
    base, _, _ = parse_search_args(["--data", "/d"], "t")
    cfg = trial_config(base, {"image_size": 256, "lr": 2e-4}, name="abc_00001", storage_uri="/s/runs")
    assert (cfg.image_size, cfg.crop_size, cfg.lr, cfg.name, cfg.storage) == (256, 224, 2e-4, "abc_00001", "/s/runs")
    fixed_crop, _, _ = parse_search_args(["--data", "/d", "--crop-size", "192"], "t")
    assert trial_config(fixed_crop, {"image_size": 320}, name="t", storage_uri="/s").crop_size == 192


def test_missing_search_algorithm_package_is_refused(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="--search-alg optuna needs the optuna package: pip install optuna"):
        check_search_alg("optuna", {})


@pytest.mark.parametrize("resources, search, expected", [
    ({"CPU": 2.0}, {}, (1, 1.0, False, 1)),                        # the 2-CPU machine: one trial at a time
    ({"CPU": 2.0}, {"workers_per_trial": 2}, (2, 0.5, False, 1)),  # two workers share what Ray Data leaves
    ({"CPU": 16.0, "GPU": 4.0}, {}, (1, 1.0, True, 4)),            # one GPU per trial, four at a time
    ({"CPU": 16.0, "GPU": 4.0}, {"workers_per_trial": 2}, (2, 1.0, True, 2)),
])
def test_trials_are_sized_so_workers_and_ray_data_fit(resources, search, expected):
    cfg, concurrent = size_trials(TrainConfig().resolved(), SearchConfig(**search), resources)
    assert (cfg.num_workers, cfg.cpus_per_worker, cfg.gpu, concurrent) == expected


def test_a_trial_larger_than_the_cluster_is_refused():
    with pytest.raises(UsageError, match="lower --workers-per-trial"):
        size_trials(TrainConfig().resolved(), SearchConfig(), {"CPU": 1.0})


def test_unknown_space_key_is_refused_before_any_trial_starts(tmp_path):
    space = write_space(tmp_path, "lr: {choice: [0.001]}\nlearning_rate: {choice: [0.001]}\n")
    proc = subprocess.run([sys.executable, "jobs/tune.py", "--storage", str(tmp_path / "runs"),
                           "--space", space], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: search space key 'learning_rate' is not a training option")
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started, not even the search's folder


def test_tune_help_documents_the_search_and_training_options():
    proc = subprocess.run([sys.executable, "jobs/tune.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--space", "--num-samples", "--max-concurrent-trials", "--workers-per-trial", "--gpus-per-worker",
                 "--cpus-per-worker", "--data-cpus-per-trial", "--scheduler", "--search-alg", "--epochs", "--data",
                 "--storage", "--name", "--image-size", "--batch-size", "--config"):
        assert flag in proc.stdout
    assert "--num-workers" not in proc.stdout and "--eval-data" not in proc.stdout


# ---------------------------------------------------------------- a real search, killed and resumed


def _trial_states(exp: Path) -> dict[str, str]:
    """Trial id -> status as Tune last saved its experiment state (what a resume reads)."""
    files = sorted(exp.glob("experiment_state-*.json"), key=os.path.getmtime)
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write: read the next version
        return {}
    states = (json.loads(t[0]) for t in data["trial_data"])
    return {s["trial_id"]: s["status"] for s in states}


def _wait_for_a_finished_trial(exp: Path, proc: subprocess.Popen, timeout: float, trials: int) -> dict:
    """The trials' states once one has finished while others have yet to (running, or not started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the search ended before it could be interrupted"
        states = _trial_states(exp)
        done = [t for t, s in states.items() if s == "TERMINATED"]
        if 0 < len(done) < trials:
            return states
        time.sleep(0.5)  # polling files a subprocess writes; there is no event to block on
    raise AssertionError(f"no trial finished within {timeout:.0f} s: {_trial_states(exp)}")


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A 2-trial ASHA search of 1 epoch at 32 px, one trial at a time, killed (SIGKILL, its whole
    process group) once the first trial has finished and the second has not (running, or still to
    start), then started again and finished."""
    from basnet.data.sample import generate_sample

    root = tmp_path_factory.mktemp("tune")
    data = generate_sample(str(root / "sample"), n_train=12, n_test=4, size=(32, 32))
    argv = [sys.executable, "jobs/tune.py", "--data", data, "--storage", str(root / "runs"), "--name", "s",
            "--space", write_space(root, SPACE), "--image-size", "32", "--epochs", "1", "--num-samples", "2",
            "--max-concurrent-trials", "1",
            "--backbone-weights", "none", "--max-failures", "1",
            "--cpus-per-worker", "0.5", "--data-cpus-per-trial", "0.5"]
    exp = root / "runs" / "s"
    with open(root / "first.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            states = _wait_for_a_finished_trial(exp, proc, timeout=900, trials=2)
            finished = {t: (exp / t / "result.json").read_text() for t, s in states.items() if s == "TERMINATED"}
            ray_processes = psutil.Process(proc.pid).children(recursive=True)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(ray_processes, timeout=120)
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1200)
    yield {"exp": exp, "finished": finished, "alive": alive, "again": again}
    shutil.rmtree(root, ignore_errors=True)  # several GB of checkpoints


def _rows(exp: Path) -> list[dict]:
    with open(exp / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
@pytest.mark.timeout(2400)  # the first of these also runs the shared search (2-3 minutes)
def test_killed_search_resumes_without_rerunning_finished_trials(search):
    assert search["alive"] == [], "processes of the killed search's Ray were left running"
    again = search["again"]
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the search" in again.stdout
    for trial_id, results in search["finished"].items():
        # Not rerun: its result file is exactly what it was when the search was killed.
        assert (search["exp"] / trial_id / "result.json").read_text() == results
    assert len(_rows(search["exp"])) == 2


@pytest.mark.ray
@pytest.mark.timeout(2400)  # the first of these also runs the shared search (2-3 minutes)
def test_asha_search_reports_every_trial_and_picks_the_lowest_val_mae(search):
    exp = search["exp"]
    rows = _rows(exp)
    assert {r["status"] for r in rows} <= {"done", "stopped"}, rows
    for row in rows:
        reports = [json.loads(line) for line in (exp / row["trial_id"] / "result.json").read_text().splitlines()]
        scored = [r["val_mae"] for r in reports if r.get("checkpoint")]
        assert float(row["val_mae"]) == pytest.approx(min(scored))  # each trial's best checkpointed epoch
        assert int(row["epochs_run"]) == max(r["epoch"] for r in reports) >= 1  # ASHA's grace: 1 epoch
        assert row["trial_id"] in search["again"].stdout  # the printed table
    maes = [float(r["val_mae"]) for r in rows]
    assert maes[0] == min(maes)  # best first


@pytest.mark.ray
@pytest.mark.timeout(2400)  # the first of these also runs the shared search (2-3 minutes)
def test_search_writes_trials_csv_best_yaml_and_checkpoint_uri(search):
    exp = search["exp"]
    best = _rows(exp)[0]
    uri = (exp / "best_checkpoint.txt").read_text().strip()
    assert uri == best["checkpoint"] and os.path.exists(os.path.join(uri, "model.pt"))
    assert f"best checkpoint: {uri}" in search["again"].stdout
    text = (exp / "best.yaml").read_text()
    assert f"# best checkpoint: {uri}" in text
    config = yaml.safe_load(text)
    assert set(config) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert config["lr"] == pytest.approx(float(best["lr"])) and config["batch_size"] == int(best["batch_size"])
    assert config["iou_weight"] == pytest.approx(float(best["iou_weight"]))
    assert (config["image_size"], config["name"], config["storage"]) == (32, "s-best", str(exp.parent))


@pytest.mark.ray
@pytest.mark.timeout(2400)  # the first of these also runs the shared search (2-3 minutes)
def test_best_yaml_is_the_training_config_jobs_train_takes_with_the_best_trials_values(search):
    # What `jobs/train.py --config best.yaml` resolves before it trains (training itself is tested in tests/train).
    exp = search["exp"]
    best = _rows(exp)[0]
    cfg = parse_config(TrainConfig, ["--config", str(exp / "best.yaml"), "--name", "from-best", "--epochs", "1"],
                       "t").resolved()
    assert cfg.lr == pytest.approx(float(best["lr"])) and cfg.batch_size == int(best["batch_size"])
    assert cfg.iou_weight == pytest.approx(float(best["iou_weight"])) and cfg.image_size == 32
    assert (cfg.name, cfg.epochs, cfg.storage) == ("from-best", 1, str(exp.parent))
