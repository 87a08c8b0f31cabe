"""BASNet: the original's layout, logit outputs at input size, gradients, backbone loading."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet34

from basnet.backbone import resnet34_layers
from basnet.model import BASNet, count_parameters
from basnet.transforms import IMAGENET_MEAN, IMAGENET_STD

LAYOUT = Path(__file__).parent / "fixtures" / "original_state_dict_layout.json"
N_OUTPUTS = 8


@pytest.fixture(scope="module")
def model() -> BASNet:
    torch.manual_seed(0)
    return BASNet()


def _forward_eval(model: BASNet, height: int, width: int) -> tuple[torch.Tensor, ...]:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(1, 3, height, width))


@pytest.fixture(scope="module")
def outputs_64(model) -> tuple[torch.Tensor, ...]:
    """One 64 x 64 eval forward shared by the tests that only inspect outputs."""
    torch.manual_seed(0)
    return _forward_eval(model, 64, 64)


def _assert_eight_maps(outputs: tuple[torch.Tensor, ...], size: tuple[int, int]) -> None:
    assert isinstance(outputs, tuple) and len(outputs) == N_OUTPUTS
    for out in outputs:
        assert out.shape == (1, 1, *size)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_forward_64_returns_eight_maps_of_input_size(outputs_64):
    _assert_eight_maps(outputs_64, (64, 64))


@pytest.mark.parametrize("size", [(256, 256), (32, 64)])
def test_forward_returns_eight_maps_of_input_size(model, size):
    _assert_eight_maps(_forward_eval(model, *size), size)


def test_outputs_are_logits_not_probabilities(outputs_64):
    values = torch.cat([out.flatten() for out in outputs_64])
    # A sigmoid would confine every value to (0, 1).
    assert (values < 0).any()


def test_refined_output_is_d1_plus_a_residual(model, outputs_64):
    refined, d1, *_ = outputs_64
    with torch.no_grad():
        assert torch.allclose(refined, model.eval().refunet(d1))
    assert not torch.equal(refined, d1)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    net = BASNet().train()
    outputs = net(torch.randn(2, 3, 64, 64))
    sum(out.sum() for out in outputs).backward()
    # In train mode a batch norm subtracts the batch mean, so the bias of the conv just
    # before it has an exactly zero true gradient: only float noise reaches it.
    before_bn = {
        f"{prefix}{name}.bias"
        for prefix, module in (("", net), ("refunet.", net.refunet))
        for name, conv in module.named_children()
        if isinstance(conv, nn.Conv2d) and hasattr(module, name.replace("conv", "bn", 1))
    }
    assert len(before_bn) == 1 + 3 + 18 + 9  # stem, bridge, decoder, refinement module
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        if name not in before_bn:
            assert param.grad.abs().sum() > 0, name


def test_parameter_count_is_the_originals(model):
    assert count_parameters(model) == 87_060_360


def test_state_dict_equals_the_original_layout_in_order(model):
    layout = json.loads(LAYOUT.read_text())
    state = model.state_dict()
    got = [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in state.items()]
    assert len(layout) == 517
    assert got == layout


def test_convs_outside_the_encoder_are_xavier_initialised(model):
    conv = model.conv6d_1  # 512 x 1024 x 3 x 3: enough weights for a tight estimate
    fan_in, fan_out = 1024 * 9, 512 * 9
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert conv.weight.abs().max() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert torch.count_nonzero(conv.bias) == 0
    assert torch.count_nonzero(model.refunet.conv_d0.bias) == 0


def test_encoder_layers_are_torchvisions_resnet34_layers_drawn_from_the_same_random_numbers():
    torch.manual_seed(3)
    ours = resnet34_layers()
    after_ours = torch.get_rng_state()
    torch.manual_seed(3)
    theirs = resnet34(weights=None)
    assert torch.equal(torch.get_rng_state(), after_ours)  # the rest of BASNet draws the same numbers too
    for i, layer in enumerate(ours, 1):
        reference = getattr(theirs, f"layer{i}").state_dict()
        assert list(layer.state_dict()) == list(reference)
        assert all(torch.equal(v, reference[k]) for k, v in layer.state_dict().items())
    x = torch.randn(1, 64, 32, 32)
    with torch.no_grad():
        for layer in ours:
            layer.eval()
        theirs.eval()
        ours_out = ours[3](ours[2](ours[1](ours[0](x))))
        theirs_out = theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(x))))
    assert torch.equal(ours_out, theirs_out)


def test_building_the_model_and_loading_a_checkpoint_import_no_torchvision():
    # torchvision costs each process that builds the model 1.6-3 s and 160 MB (basnet/backbone.py).
    code = ("import sys, basnet.model, basnet.checkpoint, basnet.train.engine, basnet.infer.predictor; "
            "basnet.model.BASNet(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_imagenet_constants_are_the_torchvision_ones():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_backbone_weights_path_loads_resnet34_layers_into_encoder(tmp_path):
    torch.manual_seed(1)
    resnet = resnet34(weights=None)
    path = tmp_path / "resnet34.pth"
    torch.save(resnet.state_dict(), path)
    net = BASNet(backbone_weights=str(path))
    assert torch.equal(net.encoder1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    assert torch.equal(net.encoder4[2].bn2.running_var, resnet.layer4[2].bn2.running_var)
    assert torch.equal(net.encoder2[0].downsample[0].weight, resnet.layer2[0].downsample[0].weight)


def test_backbone_weights_missing_file_is_a_one_line_value_error(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(ValueError, match="backbone weights not found") as info:
        BASNet(backbone_weights=str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_backbone_weights_of_another_network_are_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer1.0.conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a torchvision resnet34 state dict") as info:
        BASNet(backbone_weights=str(path))
    assert "\n" not in str(info.value)
