"""Checkpoints: save/load round trip, published state dicts, one-line errors (local files only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from basnet.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    load_for_inference,
    load_model,
    save_checkpoint,
)
from basnet.config import PUBLISHED_IMAGE_SIZE
from basnet.model import BASNet

LAYOUT = Path(__file__).parent / "fixtures" / "original_state_dict_layout.json"
NOT_FOUND_HINT = "(pass a training checkpoint directory or a basnet.pth file)"
CONFIG = {"name": "run", "train": {"lr": 0.001, "crop": [224, 224], "amp": True}, "note": None}


@pytest.fixture(scope="module")
def original_state() -> dict[str, torch.Tensor]:
    """Random tensors with the original's names, shapes and dtypes, as in basnet.pth."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape, dtype in json.loads(LAYOUT.read_text()):
        if dtype == "int64":
            state[name] = torch.randint(0, 1000, shape, generator=generator)
        else:
            state[name] = torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory, original_state) -> dict:
    """One checkpoint saved the way training saves it (DDP-prefixed keys, optimizer, scaler)."""
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    directory = str(tmp_path_factory.mktemp("run") / "epoch_0003")
    kwargs = {
        "model_state": {f"module.{k}": v for k, v in original_state.items()},
        "config": CONFIG,
        "epoch": 3,
        "metrics": {"mae": np.float32(0.25), "loss": 1.5},
        "optimizer_state": optimizer.state_dict(),
        "scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 4},
    }
    returned = save_checkpoint(directory, **kwargs)
    return {"directory": directory, "returned": returned, **kwargs}


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("prefix", ["", "module."])
def test_published_state_dict_loads_with_or_without_module_prefix(tmp_path, original_state, prefix):
    path = tmp_path / "basnet.pth"
    torch.save({prefix + k: v for k, v in original_state.items()}, path)
    model = load_model(str(path))
    assert isinstance(model, BASNet) and not model.training
    _assert_same_tensors(model.state_dict(), original_state)


def test_published_state_dict_has_no_training_config(tmp_path, original_state):
    path = tmp_path / "basnet.pth"
    torch.save(original_state, path)
    checkpoint = load_checkpoint(str(path))
    assert checkpoint["format"] == "state_dict"
    assert checkpoint["config"] is None and checkpoint["epoch"] is None
    assert checkpoint_config(str(path)) is None


def test_save_checkpoint_writes_model_pt_and_config_yaml(training_checkpoint):
    directory = Path(training_checkpoint["directory"])
    assert training_checkpoint["returned"] == training_checkpoint["directory"]
    assert sorted(p.name for p in directory.iterdir()) == ["config.yaml", "model.pt"]
    text = (directory / "config.yaml").read_text()
    assert text.startswith("# basnet-ray checkpoint: epoch 3, metrics")
    # The file is a plain training config: the epoch and metrics live only in the comment.
    assert yaml.safe_load(text) == CONFIG


def test_checkpoint_round_trip_keeps_everything(training_checkpoint, original_state):
    checkpoint = load_checkpoint(training_checkpoint["directory"])
    assert checkpoint["format"] == "basnet-ray/1"
    assert checkpoint["epoch"] == 3
    assert checkpoint["metrics"] == {"mae": 0.25, "loss": 1.5}
    assert checkpoint["config"] == CONFIG
    assert checkpoint["scaler"] == training_checkpoint["scaler_state"]
    saved_optimizer = training_checkpoint["optimizer_state"]
    assert checkpoint["optimizer"]["param_groups"] == saved_optimizer["param_groups"]
    assert torch.equal(checkpoint["optimizer"]["state"][0]["exp_avg"], saved_optimizer["state"][0]["exp_avg"])
    # Saved without the DDP prefix, so any model (wrapped or not) loads it.
    _assert_same_tensors(checkpoint["model"], original_state)


@pytest.mark.parametrize("target", ["directory", "model.pt"])
def test_load_model_from_a_training_checkpoint(training_checkpoint, original_state, target):
    source = training_checkpoint["directory"]
    if target == "model.pt":
        source = str(Path(source) / "model.pt")
    model = load_model(source)
    assert not model.training
    _assert_same_tensors(model.state_dict(), original_state)


@pytest.mark.parametrize("target", ["directory", "model.pt"])
def test_checkpoint_config_returns_the_training_config(training_checkpoint, target):
    source = training_checkpoint["directory"]
    if target == "model.pt":
        source = str(Path(source) / "model.pt")
    assert checkpoint_config(source) == CONFIG


def test_missing_checkpoint_is_a_one_line_checkpoint_error(tmp_path):
    source = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError) as info:
        load_model(source)
    assert str(info.value) == f"checkpoint not found: {source} {NOT_FOUND_HINT}"
    assert isinstance(info.value, ValueError)


def test_directory_without_model_pt_is_not_found(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*model.pt") as info:
        load_checkpoint(str(tmp_path))
    assert "\n" not in str(info.value)


def test_non_torch_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "basnet.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="is not a readable torch file") as info:
        load_model(str(path))
    assert "\n" not in str(info.value)


class _Payload:
    """A class a weights-only load must refuse to instantiate."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(CheckpointError, match="is not a readable torch file"):
        load_checkpoint(str(path))


def test_wrong_keys_name_missing_and_unexpected_counts(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(2), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="517 missing and 2 unexpected keys") as info:
        load_model(str(path))
    assert "\n" not in str(info.value)


def test_wrong_shapes_are_a_checkpoint_error(tmp_path, original_state):
    path = tmp_path / "basnet.pth"
    torch.save({**original_state, "outconv1.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="1 shapes differ .*outconv1.bias"):
        load_model(str(path))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"format": "basnet-ray/9", "model": {}}, "unsupported checkpoint format"),
        ([1, 2, 3], "neither a basnet-ray checkpoint nor a state dict"),
    ],
)
def test_other_torch_payloads_are_rejected(tmp_path, payload, message):
    path = tmp_path / "thing.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(path))


@pytest.mark.parametrize("target", ["directory", "model.pt", "published"])
def test_load_for_inference_gives_the_model_and_its_training_size_from_one_read(original_state, tmp_path, target):
    source = str(tmp_path / "basnet.pth")
    if target == "published":
        torch.save(original_state, source)
    else:
        source = save_checkpoint(str(tmp_path / "epoch_0001"), model_state=original_state,
                                 config={"image_size": 64}, epoch=1, metrics={})
        source = source if target == "directory" else str(Path(source) / "model.pt")
    model, size = load_for_inference(source)
    assert not model.training
    _assert_same_tensors(model.state_dict(), original_state)
    assert size == (PUBLISHED_IMAGE_SIZE if target == "published" else 64)
    assert load_for_inference(source, 96)[1] == 96  # --image-size wins
