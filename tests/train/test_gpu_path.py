"""The GPU path's failure modes, shown where a CPU can show them (no Ray needed).

A CPU has one device, so the device-placement tests use PyTorch's ``meta`` device as "the loop's
device": a tensor left on the CPU is then told apart from one on the device, as it would be on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from basnet.checkpoint import load_checkpoint, save_checkpoint
from basnet.config import parse_config
from basnet.device import FP32, resolve_precision
from basnet.errors import ConfigError
from basnet.loss import HybridLoss
from basnet.metrics import SODMetrics
from basnet.train.config import TrainConfig
from basnet.train.engine import SYNC_BN_BELOW, EpochStats, build_training_state, train_epoch, use_sync_bn

from conftest import load_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU, META = torch.device("cpu"), torch.device("meta")
ENGINE_FILE = os.path.join(REPO, "basnet", "train", "engine.py")


def tiny_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"backbone_weights": "none", "batch_size": 2, "image_size": 32, "crop_size": 32,
                          **overrides})


def random_batches(n: int, size: int = 32, batch: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g),
             "mask": torch.randint(0, 256, (batch, size, size), dtype=torch.uint8, generator=g)} for _ in range(n)]


# ---------------------------------------------------------------- 4. the global batch splits equally


def test_a_batch_that_does_not_split_across_the_workers_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"--batch-size 8 does not split equally across 3 workers: "
                                          r"use --batch-size 6 or 9"):
        TrainConfig(num_workers=3, batch_size=8).resolved()
    assert TrainConfig(num_workers=4, batch_size=8).resolved().batch_size == 8


def test_train_job_refuses_an_unequal_split_in_one_line_before_ray(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/train.py", "--storage", str(tmp_path), "--num-workers", "3",
                           "--batch-size", "8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("error: --batch-size 8 does not split"), proc.stderr


@pytest.mark.parametrize("device, world, batch, mode, expected", [
    ("cuda", 8, 1, "auto", True),
    ("cuda", 2, 4, "auto", True),
    ("cuda", 2, SYNC_BN_BELOW, "auto", False),
    ("cuda", 1, 1, "auto", False),
    ("cpu", 8, 1, "auto", False),
    ("cuda", 8, 16, "on", True),
    ("cuda", 8, 1, "off", False),
])
def test_sync_bn_auto_turns_on_for_small_per_gpu_batches(device, world, batch, mode, expected):
    assert use_sync_bn(mode, device=torch.device(device), world_size=world, per_worker_batch=batch) is expected


def test_sync_bn_on_for_a_cpu_run_is_refused():
    with pytest.raises(ConfigError, match="--sync-bn on needs GPUs"):
        use_sync_bn("on", device=CPU, world_size=2, per_worker_batch=1)


# ---------------------------------------------------------------- 2/3. setup order: placement first


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> dict:
    """A checkpoint with Adam state, after one real step on the CPU."""
    cfg = tiny_cfg()
    state = build_training_state(cfg, CPU)
    train_epoch(state.model, random_batches(1), HybridLoss(), state.optimizer, device=CPU)
    folder = str(tmp_path_factory.mktemp("ckpt"))
    save_checkpoint(folder, model_state=state.module.state_dict(), config=cfg.to_dict(), epoch=3, metrics={"x": 1},
                    optimizer_state=state.optimizer.state_dict())
    return load_checkpoint(folder)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_restored_optimizer_state_lives_on_the_parameters_device(trained_checkpoint):
    state = build_training_state(tiny_cfg(), META, checkpoint=trained_checkpoint)
    assert state.epoch == 3
    params = list(state.module.parameters())
    assert {p.device for p in params} == {META}
    moments = [v for s in state.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert len(moments) == 2 * len(params)  # exp_avg and exp_avg_sq of every parameter, restored
    assert {t.device for t in moments} == {META}


def test_the_model_is_placed_and_channels_last_before_it_is_wrapped():
    seen = {}

    def wrap(module):
        weights = [p for p in module.parameters() if p.dim() == 4]
        seen["device"] = {p.device for p in module.parameters()}
        seen["channels_last"] = all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
        return module

    state = build_training_state(tiny_cfg(channels_last=True), CPU, wrap=wrap)
    assert seen == {"device": {CPU}, "channels_last": True}
    assert state.memory_format == torch.channels_last


def test_channels_last_training_feeds_channels_last_inputs_and_matches_contiguous_training():
    from basnet.predict import predict_probabilities

    maps = {}
    for channels_last in (False, True):
        state = build_training_state(tiny_cfg(channels_last=channels_last), CPU)
        # Same seed, same weights: the two layouts differ only in rounding.
        maps[channels_last] = predict_probabilities(state.module.eval(), random_batches(1, seed=1)[0]["image"],
                                                    device=CPU, memory_format=state.memory_format)
        formats = []
        state.model.register_forward_pre_hook(
            lambda _m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        train_epoch(state.model, random_batches(2), HybridLoss(), state.optimizer, device=CPU,
                    memory_format=state.memory_format)
        assert formats == [channels_last, channels_last]
    assert torch.allclose(maps[True], maps[False], atol=1e-4)


# ---------------------------------------------------------------- 5. no per-step host sync


HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")


@pytest.fixture
def engine_host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value back to the host made by basnet/train/engine.py itself."""
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename == ENGINE_FILE:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


def test_the_loss_is_read_back_only_at_the_logging_interval(engine_host_reads):
    state = build_training_state(tiny_cfg(), CPU)
    logs = []
    stats = train_epoch(state.model, random_batches(7), HybridLoss(), state.optimizer, device=CPU,
                        log_every=3, on_log=logs.append, steps=7, epoch=1)
    assert [log.step for log in logs] == [3, 6]
    assert len(engine_host_reads) == 2  # one read per logging interval, none per step
    assert all(np.isfinite(log.loss) and log.images_per_s > 0 for log in logs)
    assert logs[0].line().startswith("epoch   1  step 3/7  loss ")
    assert stats.images == 14 and np.isfinite(stats.loss)


def test_without_a_logger_no_step_reads_anything_back(engine_host_reads):
    state = build_training_state(tiny_cfg(), CPU)
    stats = train_epoch(state.model, random_batches(3), HybridLoss(), state.optimizer, device=CPU, log_every=1)
    assert engine_host_reads == [] and isinstance(stats.loss_sum, torch.Tensor)


# ---------------------------------------------------------------- 1. collectives on the loop's device


class Recorded(Exception):
    """Raised by the stand-in collectives once they have recorded their tensor."""


@pytest.fixture
def collectives(monkeypatch) -> list[tuple[str, torch.device]]:
    """Pretends a process group of two is up; records the device of every tensor handed to a
    collective, then stops the caller (a meta tensor has no values to go on with)."""
    calls: list[tuple[str, torch.device]] = []

    def record(name):
        def collective(tensor, *args, **kwargs):
            calls.append((name, tensor.device))
            raise Recorded

        return collective

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    for name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, record(name))
    return calls


def test_epoch_totals_are_reduced_on_the_loops_device(collectives):
    from basnet.train.distributed import epoch_metrics

    stats = EpochStats(loss_sum=torch.tensor(3.0, dtype=torch.float64), images=4, seconds=1.5)
    with pytest.raises(Recorded):
        epoch_metrics(1, stats, SODMetrics(), META)
    assert collectives == [("all_reduce", META)]


def test_batchnorm_buffers_are_broadcast_on_the_loops_device(collectives):
    from basnet.train.distributed import sync_buffers

    model = torch.nn.BatchNorm2d(4).to(META)
    with pytest.raises(Recorded):
        sync_buffers(model)
    assert collectives == [("broadcast", META)]


# ---------------------------------------------------------------- 6. user errors on the driver


def run_train_job(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/train.py", "--storage", str(tmp_path / "runs"), "--epochs", "1",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def assert_one_error_line(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr  # Ray never started


def test_missing_backbone_weights_fail_on_the_driver_in_one_line(tmp_path):
    proc = run_train_job(tmp_path, "--backbone-weights", str(tmp_path / "resnet34.pth"))
    assert_one_error_line(proc, "backbone weights not found")


def test_backbone_weights_that_are_not_a_resnet34_fail_on_the_driver(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer1.0.conv1.weight": torch.zeros(3, 3)}, path)
    assert_one_error_line(run_train_job(tmp_path, "--backbone-weights", str(path)),
                          "not a torchvision resnet34 state dict")


def test_imagenet_weights_while_offline_fail_on_the_driver(tmp_path):
    # An empty torch cache and a proxy that refuses every connection: what an offline machine sees.
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}
    proc = run_train_job(tmp_path, "--backbone-weights", "imagenet", env=offline)
    assert_one_error_line(proc, "cannot download the ImageNet ResNet-34 weights")


def test_data_without_a_duts_layout_fails_before_ray_starts(tmp_path, monkeypatch):
    jobs_train = load_job("train")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(jobs_train, "init_ray", no_ray)
    (tmp_path / "empty").mkdir()
    assert jobs_train.main(["--data", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs")]) == 2


# ---------------------------------------------------------------- precision


def test_precision_auto_is_fp32_on_cpu_and_explicit_names_are_honoured():
    assert resolve_precision("auto", CPU) == FP32
    assert resolve_precision("bf16", CPU).dtype == torch.bfloat16
    fp16 = resolve_precision("fp16", CPU)
    assert fp16.dtype == torch.float16 and fp16.needs_scaler
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp8", CPU)


def test_bf16_training_runs_on_cpu_and_lowers_the_loss():
    state = build_training_state(tiny_cfg(precision="bf16"), CPU)
    assert state.scaler is None  # bf16 has fp32's range: no loss scaling
    batch = random_batches(1)
    losses = [train_epoch(state.model, batch, HybridLoss(), state.optimizer, device=CPU, precision=state.precision,
                          scaler=state.scaler).loss for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_fp16_training_scales_the_loss_skips_overflowing_steps_and_restores_the_scale(tmp_path):
    # At 32 px BASNet's deepest maps are 1 x 1 and fp16 gradients overflow: the GradScaler must
    # skip that step (weights unchanged) and halve its scale. (fp16 on these CPUs takes ~10 s a step.)
    cfg = tiny_cfg(precision="fp16")
    state = build_training_state(cfg, CPU)
    before = {k: v.detach().clone() for k, v in state.module.named_parameters()}
    train_epoch(state.model, random_batches(1), HybridLoss(), state.optimizer, device=CPU,
                precision=state.precision, scaler=state.scaler)
    assert state.scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(before[k], v) for k, v in state.module.named_parameters())
    save_checkpoint(str(tmp_path), model_state=state.module.state_dict(), config=cfg.to_dict(), epoch=1, metrics={},
                    optimizer_state=state.optimizer.state_dict(), scaler_state=state.scaler.state_dict())
    resumed = build_training_state(cfg, CPU, checkpoint=load_checkpoint(str(tmp_path)))
    assert resumed.scaler.get_scale() == 2.0 ** 15


def test_train_help_documents_the_gpu_options():
    proc = subprocess.run([sys.executable, "jobs/train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    for flag in ("--precision", "--channels-last", "--compile", "--sync-bn", "--log-every", "--verbose",
                 "--gpus-per-worker"):
        assert flag in proc.stdout
    cfg = parse_config(TrainConfig, ["--precision", "bf16", "--sync-bn", "off", "--compile"], "t")
    assert (cfg.precision, cfg.sync_bn, cfg.compile, cfg.log_every) == ("bf16", "off", True, 50)


# ---------------------------------------------------------------- workers the machine can feed


@pytest.fixture
def cluster(monkeypatch):
    """Stands in for the running Ray: its CPUs and GPUs, and whether this process started it."""
    from basnet.train import ray_resources as ray_train

    def set_cluster(cpus: float, gpus: float = 0.0, *, local: bool = True):
        monkeypatch.setattr(ray_train, "_cluster_cpus_gpus", lambda: (cpus, gpus))
        monkeypatch.setattr(ray_train, "started_local_ray", lambda: local)

    return set_cluster


def test_workers_that_fit_share_the_cpus_left_by_ray_data(cluster):
    from basnet.train.ray_resources import resolve_resources

    cluster(2.0)
    cfg = resolve_resources(TrainConfig(num_workers=3, batch_size=9).resolved())
    assert (cfg.num_workers, cfg.cpus_per_worker, cfg.gpu) == (3, 0.25, False)
    assert resolve_resources(TrainConfig().resolved()).cpus_per_worker == 1.0


def test_more_workers_than_this_machine_can_feed_are_refused_in_one_line(cluster):
    from basnet.errors import UsageError
    from basnet.train.ray_resources import resolve_resources

    cluster(2.0)
    with pytest.raises(UsageError, match=r"--num-workers 5 needs 5 x 0.25 CPU for the workers plus 1 for Ray "
                                         r"Data's decoding, but this machine has 2 CPUs: use --num-workers 4"):
        resolve_resources(TrainConfig(num_workers=5, batch_size=10).resolved())
    cluster(4.0, 1.0)
    with pytest.raises(UsageError, match="needs 2 GPUs but this machine has 1"):
        resolve_resources(TrainConfig(num_workers=2, gpu=True).resolved())


def test_on_a_joined_cluster_a_run_larger_than_it_waits_for_nodes(cluster, caplog):
    from basnet.train.ray_resources import resolve_resources

    cluster(2.0, 0.0, local=False)
    cfg = resolve_resources(TrainConfig(num_workers=8, batch_size=8, cpus_per_worker=1).resolved())
    assert cfg.num_workers == 8 and "waits for more nodes" in caplog.text


def test_default_gpu_workers_split_the_batch_equally(cluster, caplog):
    from basnet.train.ray_resources import resolve_resources

    cluster(16.0, 3.0)
    cfg = resolve_resources(TrainConfig(batch_size=8).resolved())
    assert (cfg.num_workers, cfg.gpu, cfg.cpus_per_worker) == (2, True, 1.0)
    assert "training on 2" in caplog.text


def test_compiled_training_steps_like_eager_training(monkeypatch):
    # The training path with --compile (compiled after DDP's wrap and the restore, a compiled
    # forward and backward, the optimizer on the bare module's parameters), run through TorchDynamo
    # and AOTAutograd with the aot_eager backend: inductor's C++ code generation for the backward
    # alone takes about 100 s on these cores. Inductor itself is exercised on BASNet's forward by
    # tests/train/test_train.py::test_compiled_masking_equals_eager_masking_within_one_grey_level.
    import functools

    import basnet.device

    monkeypatch.setattr(basnet.device.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    losses, moved = {}, {}
    for compiled in (False, True):
        state = build_training_state(tiny_cfg(compile=compiled), CPU)
        before = [p.detach().clone() for p in state.module.parameters()]
        logs = []
        train_epoch(state.model, random_batches(2), HybridLoss(), state.optimizer, device=CPU, log_every=1,
                    on_log=logs.append)
        losses[compiled] = [log.loss for log in logs]
        moved[compiled] = sum(not torch.equal(a, b) for a, b in zip(before, state.module.parameters()))
    # Same seed, same batches; at 32 px BatchNorm over 1 x 1 maps amplifies rounding, hence 0.5 %.
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)
    assert moved[True] == moved[False] > 0
