"""The model zoo: trunks with named taps, the Jigsaw head, and the weights-file format.

A *trunk* is the convolutional body of a network, split into five stages whose outputs are
the taps ``conv1``..``conv5`` (AlexNet and VGG16 can also carry ``fc6`` and ``fc7``, built with
``fc=True``). Every stage that touches features (pretext, embed, transfer, evaluate) asks a
trunk for taps by name, so no stage knows an architecture's layer indices.

Taps at a 224 px input and width 1 (channels, height, width); ``tap_shapes`` computes them for
any width and input size, and the tests check both against a real forward pass:

    ===========  ===============  ===============  ===============  ================
    tap          alexnet          vgg16            resnet18         resnet50
    ===========  ===============  ===============  ===============  ================
    conv1        (96, 55, 55)     (64, 224, 224)   (64, 112, 112)   (64, 112, 112)
    conv2        (256, 27, 27)    (128, 112, 112)  (64, 56, 56)     (256, 56, 56)
    conv3        (384, 13, 13)    (256, 56, 56)    (128, 28, 28)    (512, 28, 28)
    conv4        (384, 13, 13)    (512, 28, 28)    (256, 14, 14)    (1024, 14, 14)
    conv5        (256, 13, 13)    (512, 14, 14)    (512, 7, 7)      (2048, 7, 7)
    fc6, fc7     (4096,)          (4096,)          -                -
    ===========  ===============  ===============  ===============  ================

A tap is the stage's output after its last ReLU and before the pooling that opens the next
stage. AlexNet has the original Caffe channel counts (96-256-384-384-256; the paper's conv4 is
pooled to 5x5x384) and batch norm after every layer, so it trains from scratch with plain SGD;
VGG16 is VGG16-BN (torchvision's layer recipe); ResNets are torchvision's ResNet built from its
own blocks with every channel count scaled by ``width``.

Weights files (``teacher.pt``, ``student.pt``) hold ``{"arch", "width", "state_dict"}`` only and
are read back with ``torch.load(weights_only=True)``: no pickled code crosses a stage boundary.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ktray.rundir import config_hash, read_bytes, write_bytes_atomic

ARCHS = ("alexnet", "vgg16", "resnet18", "resnet50")


CONV_TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")


FC_TAPS = ("fc6", "fc7")


# The shapes above, as data: the documentation the tests hold the code to.
DOCUMENTED_TAPS_224: dict[str, dict[str, tuple[int, ...]]] = {
    "alexnet": {
        "conv1": (96, 55, 55),
        "conv2": (256, 27, 27),
        "conv3": (384, 13, 13),
        "conv4": (384, 13, 13),
        "conv5": (256, 13, 13),
        "fc6": (4096,),
        "fc7": (4096,),
    },
    "vgg16": {
        "conv1": (64, 224, 224),
        "conv2": (128, 112, 112),
        "conv3": (256, 56, 56),
        "conv4": (512, 28, 28),
        "conv5": (512, 14, 14),
        "fc6": (4096,),
        "fc7": (4096,),
    },
    "resnet18": {
        "conv1": (64, 112, 112),
        "conv2": (64, 56, 56),
        "conv3": (128, 28, 28),
        "conv4": (256, 14, 14),
        "conv5": (512, 7, 7),
    },
    "resnet50": {
        "conv1": (64, 112, 112),
        "conv2": (256, 56, 56),
        "conv3": (512, 28, 28),
        "conv4": (1024, 14, 14),
        "conv5": (2048, 7, 7),
    },
}


_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def scaled(channels: int, width: float) -> int:
    """A channel count times the width multiplier (at least 1)."""
    return max(1, round(channels * width))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    # No conv bias: the batch norm that follows has its own shift.
    return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _fc_bn(din: int, dout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(din, dout, bias=False), nn.BatchNorm1d(dout), nn.ReLU(inplace=True))


class Trunk(nn.Module):
    """Five named stages (``conv1``..``conv5``) and, for AlexNet/VGG with ``fc=True``, ``fc6``/``fc7``.

    ``forward(x)`` returns the ``conv5`` tap; ``taps(x, names)`` returns the requested taps and
    runs only as deep as the deepest one.
    """

    def __init__(
        self,
        arch: str,
        width: float,
        stages: Sequence[nn.Module],
        fc_in: nn.Module | None = None,
        fc_layers: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        self.arch = arch
        self.width = float(width)
        self.stages = nn.ModuleDict(dict(zip(CONV_TAPS, stages, strict=True)))
        # fc6 is fed by pool5 + flatten (``fc_in``); absent for ResNets and for fc=False.
        self.fc_in = fc_in
        self.fc = nn.ModuleDict(dict(zip(FC_TAPS, fc_layers)))

    @property
    def tap_names(self) -> tuple[str, ...]:
        return CONV_TAPS + tuple(self.fc.keys())

    @property
    def has_fc(self) -> bool:
        return len(self.fc) > 0

    def out_channels(self, tap: str = "conv5") -> int:
        """Channels (or units for fc taps) of a tap, read off the layers."""
        if tap in self.fc:
            return self.fc[tap][0].out_features
        for m in reversed(list(self.stages[tap].modules())):
            if isinstance(m, nn.BatchNorm2d):
                return m.num_features
        raise KeyError(tap)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> conv5 (B, C5, h, w)
        for stage in self.stages.values():
            x = stage(x)
        return x

    def taps(self, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """The requested taps of ``x`` (B, 3, H, W), by name."""
        unknown = [n for n in names if n not in self.tap_names]
        if unknown:
            raise KeyError(f"{self.arch} has no tap {unknown}; taps: {', '.join(self.tap_names)}")
        order = self.tap_names
        last = max(order.index(n) for n in names)
        out: dict[str, Tensor] = {}
        for name in order[: last + 1]:
            if name in self.stages:
                x = self.stages[name](x)
            else:
                if name == "fc6":
                    assert self.fc_in is not None
                    x = self.fc_in(x)  # (B, C5 * p * p)
                x = self.fc[name](x)
            if name in names:
                out[name] = x
        return out


def _alexnet(width: float, fc: bool) -> Trunk:
    c = [scaled(n, width) for n in (96, 256, 384, 384, 256)]
    stages = [
        nn.Sequential(*_conv_bn(3, c[0], 11, 4, 2)),
        nn.Sequential(nn.MaxPool2d(3, 2), *_conv_bn(c[0], c[1], 5, 1, 2)),
        nn.Sequential(nn.MaxPool2d(3, 2), *_conv_bn(c[1], c[2], 3, 1, 1)),
        nn.Sequential(*_conv_bn(c[2], c[3], 3, 1, 1)),
        nn.Sequential(*_conv_bn(c[3], c[4], 3, 1, 1)),
    ]
    if not fc:
        return Trunk("alexnet", width, stages)
    h = scaled(4096, width)
    # pool5 as an adaptive max pool to 6x6: on the 13x13 conv5 of a 224 px input its windows are
    # exactly MaxPool2d(3, 2)'s, and fc6 still gets 6x6 from inputs of any size.
    fc_in = nn.Sequential(nn.AdaptiveMaxPool2d(6), nn.Flatten())
    return Trunk("alexnet", width, stages, fc_in, [_fc_bn(c[4] * 36, h), _fc_bn(h, h)])


def _vgg16(width: float, fc: bool) -> Trunk:
    stages: list[nn.Module] = []
    cin = 3
    for i, block in enumerate(_VGG16_BLOCKS):
        layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if i else []
        for cout in block:
            layers += _conv_bn(cin, scaled(cout, width), 3, 1, 1)
            cin = scaled(cout, width)
        stages.append(nn.Sequential(*layers))
    if not fc:
        return Trunk("vgg16", width, stages)
    h = scaled(4096, width)
    # pool5 to 7x7 (on 14x14 exactly MaxPool2d(2, 2)), whatever the input size.
    fc_in = nn.Sequential(nn.AdaptiveMaxPool2d(7), nn.Flatten())
    return Trunk("vgg16", width, stages, fc_in, [_fc_bn(cin * 49, h), _fc_bn(h, h)])


class _ScaledResNet(torchvision.models.ResNet):
    """torchvision's ResNet with every channel count times ``width`` (its own ``_make_layer``)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], width: float) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.groups, self.base_width, self.dilation = 1, 64, 1
        self.inplanes = scaled(64, width)
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, scaled(64, width), layers[0])
        self.layer2 = self._make_layer(block, scaled(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(block, scaled(256, width), layers[2], stride=2)
        self.layer4 = self._make_layer(block, scaled(512, width), layers[3], stride=2)


def _resnet(arch: str, width: float) -> Trunk:
    block, layers = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]
    r = _ScaledResNet(block, layers, width)
    stages = [
        nn.Sequential(r.conv1, r.bn1, r.relu),
        nn.Sequential(r.maxpool, r.layer1),
        r.layer2,
        r.layer3,
        r.layer4,
    ]
    return Trunk(arch, width, stages)


def init_weights(module: nn.Module) -> None:
    # torchvision's ResNet/VGG initialisation: He normal (fan_out) for convs, BN at identity.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_trunk(arch: str, width: float = 1.0, *, fc: bool = False) -> Trunk:
    """A freshly initialised trunk. ``fc=True`` adds ``fc6``/``fc7`` (AlexNet and VGG16 only)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if arch == "alexnet":
        trunk = _alexnet(width, fc)
    elif arch == "vgg16":
        trunk = _vgg16(width, fc)
    else:
        if fc:
            raise ValueError(f"{arch} has no fc6/fc7 layers; fc=True is for alexnet and vgg16")
        trunk = _resnet(arch, width)
    init_weights(trunk)
    return trunk


def tap_shapes(
    arch: str, width: float = 1.0, input_size: int = 224, *, fc: bool | None = None
) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every tap at a square ``input_size`` input, without computing anything.

    Runs the trunk on PyTorch's ``meta`` device (shapes only, no memory, no FLOPs).
    ``fc=None`` includes fc6/fc7 where the architecture has them.
    """
    fc = arch in ("alexnet", "vgg16") if fc is None else fc
    with torch.device("meta"):
        trunk = build_trunk(arch, width, fc=fc).eval()
        x = torch.empty(2, 3, input_size, input_size)
        out = trunk.taps(x, trunk.tap_names)
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


def save_weights(trunk: Trunk, uri: str) -> None:
    """Write ``{"arch", "width", "state_dict"}`` atomically to a local path or URI."""
    state = {k: v.detach().cpu() for k, v in trunk.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"arch": trunk.arch, "width": trunk.width, "state_dict": state}, buf)
    write_bytes_atomic(uri, buf.getvalue())


def read_weights(uri: str) -> dict[str, Any]:
    """The raw weights dict; ``weights_only=True`` refuses anything but tensors and plain data."""
    blob = torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"arch", "width", "state_dict"} <= blob.keys():
        raise ValueError(f"{uri}: not a ktray weights file (expected keys arch, width, state_dict)")
    return blob


def load_trunk(uri: str) -> Trunk:
    """Read a weights file back into a trunk of the recorded arch and width (eval mode)."""
    blob = read_weights(uri)
    fc = any(k.startswith("fc.") for k in blob["state_dict"])
    trunk = build_trunk(str(blob["arch"]), float(blob["width"]), fc=fc)
    trunk.load_state_dict(blob["state_dict"], strict=True)
    return trunk.eval()


# --------------------------------------------------------------------------- frozen trunks and inputs

RANDOM_PREFIX = "random:"


def build_random_trunk(spec: str, width: float, seed: int) -> Any:
    """``random:<arch>[:<width>]``: a randomly initialised trunk (the paper's "random" floor), seeded.

    The same seed gives the same weights in every extraction actor and in every run.
    """

    parts = spec[len(RANDOM_PREFIX) :].split(":")
    arch = parts[0]
    if len(parts) > 1:
        width = float(parts[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_trunk(arch, width).eval()


def load_any_trunk(trunk: Any, width: float = 1.0, seed: int = 0) -> Any:
    """A frozen trunk (eval mode, no gradients) from a weights URI, a ``random:`` spec or a module."""

    if isinstance(trunk, str):
        module = build_random_trunk(trunk, width, seed) if trunk.startswith(RANDOM_PREFIX) else load_trunk(trunk)
    else:
        module = trunk
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def trunk_key(trunk: str, width: float, seed: int) -> str:
    """Identity of a trunk for the run directory: the content hash of its weights file."""

    if trunk.startswith(RANDOM_PREFIX):
        return "trunk-" + config_hash(trunk, width, seed)
    return "trunk-" + hashlib.sha256(read_bytes(trunk)).hexdigest()[:10]


def standardise(pixels: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), each image at zero mean and unit variance.

    The one input rule of every trunk: the teacher saw Jigsaw tiles normalised this way, each on
    its own (after the release's per-tile normalisation), so whole images get the same
    treatment wherever a trunk sees them (embed, transfer, ISD, distillation, evaluate).
    """
    if isinstance(pixels, np.ndarray):
        pixels = np.ascontiguousarray(pixels)
    x = torch.as_tensor(pixels, device=device).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(1.0)
