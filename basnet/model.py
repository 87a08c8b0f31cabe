"""BASNet: boundary-aware salient object detection (Qin et al., CVPR 2019).

Paper: https://openaccess.thecvf.com/content_CVPR_2019/html/Qin_BASNet_Boundary-Aware_Salient_Object_Detection_CVPR_2019_paper.html

The module names below are those of the original release, so its published
``basnet.pth`` loads with ``strict=True``. Two deliberate departures: ``forward``
returns logits (the sigmoid is applied by the caller, so the loss can use
``binary_cross_entropy_with_logits``), and every upsampling targets the size of
the tensor it is joined with, which equals the original's fixed x2..x32 factors
on inputs whose sides are multiples of 32.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from basnet.backbone import BasicBlock, resnet34_layers
from basnet.errors import UserError, first_line

logger = logging.getLogger(__name__)


class BackboneWeightsError(UserError):
    """Backbone weights that cannot be had: a missing or foreign file, or no way to download them."""

# Decoder stages, deepest first: (name, in, mid, out channels, dilation of `_m` and `_2`).
# Only stage 6d, which runs at the bridge's 1/32 scale, keeps the bridge's dilation.
_DECODER = (
    ("6d", 1024, 512, 512, 2),
    ("5d", 1024, 512, 512, 1),
    ("4d", 1024, 512, 256, 1),
    ("3d", 512, 256, 128, 1),
    ("2d", 256, 128, 64, 1),
    ("1d", 128, 64, 64, 1),
)
# Side-output heads: outconvb reads the bridge, outconv6..1 read decoder stages 6d..1d.
_SIDE_CHANNELS = (("b", 512), ("6", 512), ("5", 512), ("4", 256), ("3", 128), ("2", 64), ("1", 64))


def _add_conv_bn_relu(
    module: nn.Module, tag: str, in_ch: int, out_ch: int, dilation: int = 1
) -> None:
    """Register ``conv<tag>``, ``bn<tag>``, ``relu<tag>`` on ``module``.

    Flat attributes (rather than an ``nn.Sequential``) keep the original's
    state-dict keys, such as ``conv6d_1.weight`` and ``bn6d_1.running_mean``.
    """
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
    module.add_module(f"conv{tag}", conv)
    module.add_module(f"bn{tag}", nn.BatchNorm2d(out_ch))
    module.add_module(f"relu{tag}", nn.ReLU(inplace=True))


def _conv_bn_relu(module: nn.Module, tag: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the ``conv<tag>`` -> ``bn<tag>`` -> ``relu<tag>`` triple of ``module``."""
    x = getattr(module, f"conv{tag}")(x)
    return getattr(module, f"relu{tag}")(getattr(module, f"bn{tag}")(x))


def _upsample_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (align_corners=False, as ``nn.Upsample`` defaults)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class RefUnet(nn.Module):
    """Residual refinement module: a small U-Net that predicts a correction.

    Args:
        in_ch: Channels of the coarse map to refine (1).
        mid_ch: Width of ``conv0``, the stem (64).
    """

    def __init__(self, in_ch: int = 1, mid_ch: int = 64) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_ch, mid_ch, 3, padding=1)
        for i in range(1, 5):
            _add_conv_bn_relu(self, str(i), mid_ch if i == 1 else 64, 64)
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2, ceil_mode=True))
        _add_conv_bn_relu(self, "5", 64, 64)
        for i in range(4, 0, -1):
            _add_conv_bn_relu(self, f"_d{i}", 128, 64)
        self.conv_d0 = nn.Conv2d(64, in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hx = self.conv0(x)  # (B, 64, H, W)
        skips = []
        for i in range(1, 5):  # encoder: skips at H, H/2, H/4, H/8
            hx = _conv_bn_relu(self, str(i), hx)
            skips.append(hx)
            hx = getattr(self, f"pool{i}")(hx)
        hx = _conv_bn_relu(self, "5", hx)  # (B, 64, H/16, W/16)
        for i in range(4, 0, -1):  # decoder: back to (B, 64, H, W)
            skip = skips[i - 1]
            hx = torch.cat((_upsample_to(hx, skip.shape[-2:]), skip), 1)
            hx = _conv_bn_relu(self, f"_d{i}", hx)
        return x + self.conv_d0(hx)  # (B, 1, H, W): coarse logits + residual


class BASNet(nn.Module):
    """BASNet predict module (ResNet-34 encoder, bridge, decoder) plus RefUnet.

    Input: RGB scaled to [0, 1] then normalised with ImageNet's mean and std
    (``basnet.device.to_model_input``), shape (N, 3, H, W) with H and W multiples of 32.
    Output: a tuple of 8 logit maps (N, 1, H, W): refined, d1, d2, d3, d4, d5,
    d6, bridge. 87,060,360 parameters.

    Args:
        backbone_weights: ``None`` leaves the encoder randomly initialised;
            ``"imagenet"`` downloads torchvision's ResNet34_Weights.IMAGENET1K_V1;
            any other string is the path of a local torchvision resnet34 state
            dict file. Only ``layer1..layer4`` are used (the original drops the
            7x7 stem and its max-pool).
    """

    def __init__(self, *, backbone_weights: str | None = None) -> None:
        super().__init__()
        layers = resnet34_layers()
        self.inconv = nn.Conv2d(3, 64, 3, padding=1)
        self.inbn = nn.BatchNorm2d(64)
        self.inrelu = nn.ReLU(inplace=True)
        self.encoder1, self.encoder2, self.encoder3, self.encoder4 = layers
        for stage in (5, 6):  # two extra 512-wide stages, each one max-pool deeper
            self.add_module(f"pool{stage - 1}", nn.MaxPool2d(2, 2, ceil_mode=True))
            for j in range(1, 4):
                self.add_module(f"resb{stage}_{j}", BasicBlock(512, 512))
        for part in ("_1", "_m", "_2"):
            _add_conv_bn_relu(self, f"bg{part}", 512, 512, dilation=2)
        for name, cin, cmid, cout, dilation in _DECODER:
            _add_conv_bn_relu(self, f"{name}_1", cin, cmid)
            _add_conv_bn_relu(self, f"{name}_m", cmid, cmid, dilation)
            _add_conv_bn_relu(self, f"{name}_2", cmid, cout, dilation)
        for tag, channels in _SIDE_CHANNELS:
            self.add_module(f"outconv{tag}", nn.Conv2d(channels, 1, 3, padding=1))
        self.refunet = RefUnet(1, 64)
        self._init_weights()
        if backbone_weights is not None:
            self._load_backbone(backbone_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self._encode(x)
        bridge = self._bridge(features[-1])
        decoded = self._decode(bridge, features)
        return self._heads(bridge, decoded, x.shape[-2:])

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the six encoder features h1..h6 (finest first)."""
        hx = self.inrelu(self.inbn(self.inconv(x)))  # (B, 64, H, W)
        h1 = self.encoder1(hx)  # (B, 64, H, W)
        h2 = self.encoder2(h1)  # (B, 128, H/2, W/2)
        h3 = self.encoder3(h2)  # (B, 256, H/4, W/4)
        h4 = self.encoder4(h3)  # (B, 512, H/8, W/8)
        h5 = self.resb5_3(self.resb5_2(self.resb5_1(self.pool4(h4))))  # (B, 512, H/16, W/16)
        h6 = self.resb6_3(self.resb6_2(self.resb6_1(self.pool5(h5))))  # (B, 512, H/32, W/32)
        return [h1, h2, h3, h4, h5, h6]

    def _bridge(self, h6: torch.Tensor) -> torch.Tensor:
        """Three dilated convolutions at 1/32 scale: (B, 512, H/32, W/32)."""
        hx = h6
        for part in ("_1", "_m", "_2"):
            hx = _conv_bn_relu(self, f"bg{part}", hx)
        return hx

    def _decode(self, bridge: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return decoder outputs hd6..hd1 (deepest first).

        Stage 6d joins the bridge with h6 at the same scale; each later stage joins
        the x2-upsampled previous output with its encoder skip, decoder first.
        Widths: hd6, hd5 512 @ 1/32, 1/16; hd4 256 @ 1/8; hd3 128 @ 1/4;
        hd2 64 @ 1/2; hd1 64 @ 1.
        """
        hx, outputs = bridge, []
        for (name, *_), skip in zip(_DECODER, reversed(features)):
            hx = _upsample_to(hx, skip.shape[-2:])  # no-op for stage 6d
            hx = torch.cat((hx, skip), 1)
            for part in ("_1", "_m", "_2"):
                hx = _conv_bn_relu(self, f"{name}{part}", hx)
            outputs.append(hx)
        return outputs

    def _heads(
        self, bridge: torch.Tensor, decoded: list[torch.Tensor], size: torch.Size
    ) -> tuple[torch.Tensor, ...]:
        """Side-output logits at input size, then the refined map; all (B, 1, H, W)."""
        sides = []
        for (tag, _), feature in zip(_SIDE_CHANNELS, [bridge, *decoded]):
            sides.append(_upsample_to(getattr(self, f"outconv{tag}")(feature), size))
        db, d6, d5, d4, d3, d2, d1 = sides
        refined = self.refunet(d1)
        return refined, d1, d2, d3, d4, d5, d6, db

    def _init_weights(self) -> None:
        """Xavier-initialise every convolution outside the ResNet-34 encoder (as the paper says).

        The encoder keeps torchvision's initialisation, replaced by the
        pretrained weights when ``backbone_weights`` is given.
        """
        encoder = {id(m) for i in range(1, 5) for m in getattr(self, f"encoder{i}").modules()}
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in encoder:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _load_backbone(self, source: str) -> None:
        """Copy ResNet-34 ``layer1..layer4`` weights into ``encoder1..encoder4``."""
        _copy_backbone(self, backbone_state_dict(source), source)
        logger.info("loaded ResNet-34 backbone weights from %s", source)


def _copy_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    for i in range(1, 5):
        prefix = f"layer{i}."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            getattr(model, f"encoder{i}").load_state_dict(part)
        except RuntimeError as error:
            raise BackboneWeightsError(
                f"backbone weights {source!r} are not a torchvision resnet34 state dict "
                f"(layer{i} does not match: {str(error).splitlines()[0]})"
            ) from None


def backbone_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The torchvision ResNet-34 state dict ``source`` names: ``"imagenet"`` (downloaded once into
    torch's cache) or a local file."""
    return _imagenet_state_dict() if source == "imagenet" else _local_state_dict(source)


def check_backbone_weights(source: str | None) -> None:
    """Fails now, in one line, if ``source`` cannot initialise the encoder.

    Jobs call this on the driver before Ray starts, so a missing file or an offline machine is an
    argument error (exit 2) instead of a failure inside every training worker. ``"imagenet"`` is
    downloaded into torch's cache here, so a single-machine run reads it from there afterwards.

    Raises:
        BackboneWeightsError: The file is missing or not a resnet34 state dict, or the download failed.
    """
    if source in (None, "none"):
        return
    encoders = nn.ModuleDict({f"encoder{i}": layer for i, layer in enumerate(resnet34_layers(), 1)})
    _copy_backbone(encoders, backbone_state_dict(source), source)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    """Download torchvision's ImageNet ResNet-34 weights (cached under TORCH_HOME)."""
    from torchvision.models import ResNet34_Weights  # only here: see basnet/backbone.py

    try:
        return ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; bad hash a RuntimeError
        raise BackboneWeightsError(
            f"cannot download the ImageNet ResNet-34 weights (offline? {first_line(error)}); "
            "pass a local torchvision resnet34 state dict file as --backbone-weights PATH, or none"
        ) from None


def _local_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a torchvision resnet34 state dict file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BackboneWeightsError(
            f"backbone weights not found: {path} "
            "(pass imagenet, none or a torchvision resnet34 state dict file)"
        ) from None
    except Exception as error:  # torch.load raises many types for files that are not checkpoints
        raise BackboneWeightsError(
            f"backbone weights {path} cannot be read as a state dict: {first_line(error)}"
        ) from None
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise BackboneWeightsError(f"backbone weights {path} hold a {kind}, not a state dict")
    return state


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters of ``model`` (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
