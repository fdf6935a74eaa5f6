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

torchvision twins: a ResNet trunk's conv layers are torchvision's ``resnet18``/``resnet50`` under
the same key names (``conv1``, ``bn1``, ``layer1``..``layer4``; ``fc`` is not part of a trunk);
VGG16's are ``vgg16_bn().features`` without its last max pool (torchvision's convs carry a
bias, ktray's fold it into the batch norm's shift: zero out, ``running_mean`` in).
AlexNet-BN has no torchvision twin; its torchvision-style layout is the documented module
:func:`features` (the five stages flattened into one ``nn.Sequential``, keys ``features.<i>``).
fc6/fc7 (batch-normed, max-pooled) have no torchvision counterpart and stay in ktray's format.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import pickle
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ktray.config import MAX_WIDTH, RANDOM_TRUNK, TORCHVISION_TRUNK, parse_random_trunk, width_ok
from ktray.rundir import config_hash, read_bytes, write_bytes_atomic
from ktray.schema import SchemaError

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


# A weights file is read as untrusted: every size it claims (its width, its tensors' shapes, its
# records' lengths) is checked against what a config allows and what the file holds before
# anything is allocated from it. Refusals are SchemaError: one line naming the file and the field.


def _load_torch(uri: str, data: bytes) -> Any:
    """``torch.load(weights_only=True)`` of a file that holds what it claims.

    torch.save writes a zip of stored (uncompressed) records, so the records of an honest file
    add up to no more than its size; a compressed record (a zip bomb: torch would inflate it on
    load) or the pre-1.6 format (whose storages declare their own sizes) is refused unread.
    """
    if data[:4] != b"PK\x03\x04":
        raise SchemaError(f"{uri}: not a weights file in torch.save's zip format")
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise SchemaError(f"{uri}: not a weights file: a damaged zip ({exc})") from None
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise SchemaError(f"{uri}: compressed record {packed[0]!r}: torch.save stores records uncompressed")
    if sum(i.file_size for i in infos) > len(data):
        raise SchemaError(f"{uri}: its records claim more bytes than the file's {len(data):,}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError) as exc:
        text = " ".join(str(exc).split())
        detail = text.split("WeightsUnpickler error: ", 1)[-1]
        raise SchemaError(f"{uri}: refused by torch.load(weights_only=True): {detail[:300]}") from None


def _spec(uri: str, arch: object, width: object) -> tuple[str, float]:
    """The arch and width a weights file records, held to what a config may ask for."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise SchemaError(f"{uri}: arch {arch!r} is not one of {', '.join(ARCHS)}")
    if not width_ok(width):
        raise SchemaError(f"{uri}: width {width!r} is not a width a config accepts (a number > 0 and <= {MAX_WIDTH:g})")
    return arch, float(width)  # type: ignore[arg-type]


def _check_tensors(uri: str, state: object) -> dict[str, Tensor]:
    """``state`` as a state dict whose tensors hold their elements: dense CPU tensors whose bytes add
    up to no more than their storages hold (an expanded, stride-0 tensor claims GiBs on 4 bytes)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise SchemaError(f"{uri}: state_dict is not a mapping of names to tensors")
    held: dict[int, int] = {}
    claimed = 0
    for key, t in state.items():
        if t.layout != torch.strided or t.device.type != "cpu":
            raise SchemaError(f"{uri}: state_dict[{key!r}] is a {t.layout} tensor on {t.device}, not a dense CPU one")
        storage = t.untyped_storage()
        held[storage.data_ptr()] = storage.nbytes()
        claimed += t.numel() * t.element_size()
    if claimed > sum(held.values()):
        raise SchemaError(f"{uri}: state_dict's tensors claim {claimed:,} bytes but hold {sum(held.values()):,}")
    return state


def _check_shapes(uri: str, arch: str, width: float, state: dict[str, Tensor]) -> bool:
    """Whether ``state`` has fc6/fc7; SchemaError unless its keys and shapes are exactly those of the
    trunk it names (compared on the meta device: nothing is allocated)."""
    fc = any(k.startswith("fc.") for k in state)
    if fc and arch.startswith("resnet"):
        raise SchemaError(f"{uri}: state_dict has fc6/fc7 keys, which a {arch} has not")
    with torch.device("meta"):
        expected = build_trunk(arch, width, fc=fc).state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise SchemaError(f"{uri}: state_dict does not match the {arch} of width {width:g}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise SchemaError(f"{uri}: state_dict[{key!r}] has shape {tuple(state[key].shape)}; the {arch} of "
                              f"width {width:g} has {tuple(ref.shape)}")
    return fc


def read_weights(uri: str) -> dict[str, Any]:
    """The weights dict (``arch``, ``width``, ``state_dict``), every claim checked; ``weights_only=True``
    refuses anything but tensors and plain data."""
    return _ktray_blob(uri, _load_torch(uri, read_bytes(uri)))


def _ktray_blob(uri: str, blob: object) -> dict[str, Any]:
    if not isinstance(blob, dict) or not {"arch", "width", "state_dict"} <= blob.keys():
        raise SchemaError(f"{uri}: not a ktray weights file (expected keys arch, width, state_dict)")
    arch, width = _spec(uri, blob["arch"], blob["width"])
    state = _check_tensors(uri, blob["state_dict"])
    _check_shapes(uri, arch, width, state)
    return {**blob, "arch": arch, "width": width, "state_dict": state}


def load_trunk(uri: str) -> Trunk:
    """Read a weights file back into a trunk of the recorded arch and width (eval mode)."""
    blob = read_weights(uri)
    return _from_ktray_state(uri, blob["arch"], blob["width"], blob["state_dict"])


# --------------------------------------------------------------------------- torchvision twins

# ResNet: ktray key prefix -> torchvision key prefix (stages.conv2.0 is the parameterless max pool).
_RESNET_PREFIXES = {
    "stages.conv1.0.": "conv1.",
    "stages.conv1.1.": "bn1.",
    "stages.conv2.1.": "layer1.",
    "stages.conv3.": "layer2.",
    "stages.conv4.": "layer3.",
    "stages.conv5.": "layer4.",
}
_RESNET_TAP_NODES = {"conv1": "relu", "conv2": "layer1", "conv3": "layer2", "conv4": "layer3", "conv5": "layer4"}


def features(trunk: Trunk) -> nn.Sequential:
    """AlexNet's or VGG16's conv stages as one ``nn.Sequential`` (shared modules): the documented module.

    For VGG16 it is ``torchvision.models.vgg16_bn().features[:-1]`` with bias-free convs; for
    AlexNet-BN it is the module its torchvision-format weights (keys ``features.<i>.*``) load into.
    """
    if trunk.arch.startswith("resnet"):
        raise ValueError(f"{trunk.arch} is a torchvision ResNet already; features() is for alexnet and vgg16")
    return nn.Sequential(*[m for stage in trunk.stages.values() for m in stage])


def _torchvision_prefixes(trunk: Trunk) -> dict[str, str]:
    if trunk.arch.startswith("resnet"):
        return dict(_RESNET_PREFIXES)
    out, i = {}, 0
    for name, stage in trunk.stages.items():
        for j in range(len(stage)):
            out[f"stages.{name}.{j}."] = f"features.{i}."
            i += 1
    return out


def _torchvision_key(prefixes: dict[str, str], key: str) -> str | None:
    for ours, theirs in prefixes.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None  # fc6/fc7: no torchvision counterpart


def torchvision_taps(trunk: Trunk) -> dict[str, str]:
    """Each conv tap's node in the torchvision layout (``return_nodes`` of ``create_feature_extractor``)."""
    if trunk.arch.startswith("resnet"):
        return dict(_RESNET_TAP_NODES)
    out, end = {}, 0
    for name, stage in trunk.stages.items():
        end += len(stage)
        out[name] = f"features.{end - 1}"  # the stage's last ReLU
    return out


def torchvision_state_dict(trunk: Trunk) -> dict[str, Tensor]:
    """The conv stages under torchvision's key names (module docstring); fc6/fc7 are left out.

    Loads with ``strict=False`` into ``torchvision.models.resnet18/50()`` (missing: ``fc``) or
    ``vgg16_bn()`` (missing: ``classifier``) at width 1, and into :func:`features` for AlexNet.
    """
    prefixes = _torchvision_prefixes(trunk)
    out: dict[str, Tensor] = {}
    for key, value in trunk.state_dict().items():
        theirs = _torchvision_key(prefixes, key)
        if theirs is not None:
            out[theirs] = value.detach().cpu().clone()
    if trunk.arch == "vgg16":
        for i, m in enumerate(features(trunk)):
            if isinstance(m, nn.Conv2d):
                out[f"features.{i}.bias"] = torch.zeros(m.out_channels)
    return out


def _width_from_shapes(
    arch: str, state: dict[str, Tensor], reference: dict[str, Tensor], keys: dict[str, str]
) -> float:
    """The width multiplier that gives every layer of ``state`` its channel count.

    Counts are ``scaled(nominal, width)`` (ResNet's bottleneck outputs 4x one), so the widths
    between two rounding cuts of any nominal count all build the same trunk: one try per interval
    (the shortest decimal in it, shortest first) on the meta device.
    """
    c1 = state[keys["stages.conv1.0.weight"]].shape[0]
    n1 = reference["stages.conv1.0.weight"].shape[0]
    lo, hi = (c1 - 0.5) / n1, (c1 + 0.5) / n1
    if lo >= MAX_WIDTH:
        raise ValueError(f"{c1} conv1 channels: a {arch} wider than a config accepts (width <= {MAX_WIDTH:g})")
    nominals = {v.shape[0] for v in reference.values() if v.dim() == 4}
    cuts = sorted({lo, hi} | {(k + 0.5) / n for n in nominals for k in range(int(lo * n), int(hi * n) + 1)
                             if lo < (k + 0.5) / n < hi})
    shortest = [next((d, r) for d in range(1, 12) if a < (r := round((a + b) / 2, d)) < b)
                for a, b in itertools.pairwise(cuts)]
    for _, w in sorted(shortest):  # 0.125 before 0.1241 when both build it
        with torch.device("meta"):
            shapes = build_trunk(arch, w).state_dict()
        if all(shapes[k].shape == state[t].shape for k, t in keys.items()):
            return w
    raise ValueError(f"channel counts fit no {arch} width multiplier")


def from_torchvision(state: dict[str, Tensor], width: float | None = None) -> Trunk:
    """A trunk (eval mode) from a torchvision-layout state dict: resnet18, resnet50, vgg16_bn or AlexNet-BN.

    The architecture is the one whose key set matches (``fc.*``/``classifier.*`` ignored); the width is
    read off the channel counts unless given. VGG conv biases are folded into the next batch norm.
    """
    convs = {k for k, v in state.items() if k.endswith(".weight") and v.dim() == 4}
    biases = {k.removesuffix("weight") + "bias" for k in convs} & state.keys()
    rest = {k for k in state if not k.startswith(("fc.", "classifier."))}
    for arch in ARCHS:
        with torch.device("meta"):
            ref = build_trunk(arch, 1.0)
        prefixes = _torchvision_prefixes(ref)
        reference = ref.state_dict()
        keys = {k: t for k in reference if (t := _torchvision_key(prefixes, k)) is not None}
        fold = set() if arch.startswith("resnet") else biases  # VGG's convs carry biases, ktray's none
        if set(keys.values()) != rest - fold:
            continue
        w = _width_from_shapes(arch, state, reference, keys) if width is None else width
        if not width_ok(w):
            raise ValueError(f"width {w!r}: a {arch} wider than a config accepts (width <= {MAX_WIDTH:g})")
        ours = {k: state[t].clone() for k, t in keys.items()}
        for b in fold:  # conv bias -> the following batch norm's running mean
            i = int(b.split(".")[1])
            ours[_ours(prefixes, f"features.{i + 1}.running_mean")] -= state[b]
        with torch.device("meta"):
            trunk = build_trunk(arch, w)
        trunk.load_state_dict(ours, strict=True, assign=True)
        return trunk.eval()
    sample = ", ".join(sorted(state)[:4])
    raise ValueError(
        f"not a ktray trunk nor a torchvision state dict of resnet18, resnet50, vgg16_bn or ktray's AlexNet-BN "
        f"features (keys: {sample}, ...)"
    )


def _ours(prefixes: dict[str, str], theirs: str) -> str:
    for ours, t in prefixes.items():
        if theirs.startswith(t):
            return ours + theirs[len(t) :]
    raise KeyError(theirs)


def _safetensors_metadata(data: bytes) -> dict[str, object] | None:
    """The ``__metadata__`` of a safetensors blob, or None when ``data`` is not one (8-byte header length, JSON)."""
    if len(data) < 10 or data[8:9] != b"{":
        return None
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _number(text: object) -> object:
    """A safetensors metadata value (always a string) as a number when it reads as one; else as it is."""
    try:
        return float(text) if isinstance(text, str) else text
    except ValueError:
        return text


def _read_state(uri: str) -> tuple[tuple[str, float] | None, dict[str, Tensor]]:
    """``((arch, width) or None for a torchvision layout, state dict)`` of any weights file ktray reads,
    every claim checked but the shapes (:func:`_check_shapes`, :func:`from_torchvision`)."""
    data = read_bytes(uri)
    meta = _safetensors_metadata(data)
    if meta is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            state = _check_tensors(uri, load_safetensors(data))
        except SafetensorError as exc:
            raise SchemaError(f"{uri}: not a readable safetensors file ({exc})") from None
        return (_spec(uri, meta["arch"], _number(meta.get("width"))) if "arch" in meta else None), state
    blob = _load_torch(uri, data)
    if isinstance(blob, dict) and {"arch", "width", "state_dict"} <= blob.keys():
        blob = _ktray_blob(uri, blob)
        return (blob["arch"], blob["width"]), blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise SchemaError(f"{uri}: neither ktray weights nor a state dict of tensors")
    return None, _check_tensors(uri, blob)


def read_trunk(uri: str) -> Trunk:
    """A trunk (eval mode) from any weights file ktray reads.

    ktray's own ``teacher.pt``/``student.pt``; a torchvision-layout state dict (``torch.save``,
    e.g. torchvision's published weights or ``ktray export --format torchvision``); or
    safetensors in either layout (ktray's records ``arch`` and ``width`` in its metadata).
    """
    spec, state = _read_state(uri)
    if spec is not None:
        return _from_ktray_state(uri, *spec, state)
    try:
        return from_torchvision(state)
    except ValueError as exc:
        raise SchemaError(f"{uri}: {exc}") from None


def check_weights(uri: str) -> None:
    """Every check :func:`read_trunk` makes, without building a ktray trunk (a torchvision layout is
    read on the meta device): a file refused here is refused before any worker loads it."""
    spec, state = _read_state(uri)
    if spec is not None:
        _check_shapes(uri, *spec, state)
        return
    try:
        from_torchvision(state)
    except ValueError as exc:
        raise SchemaError(f"{uri}: {exc}") from None


def _from_ktray_state(uri: str, arch: str, width: float, state: dict[str, Tensor]) -> Trunk:
    """The trunk ``state`` holds, built only once its keys and shapes match (:func:`_check_shapes`)."""
    trunk = build_trunk(arch, width, fc=_check_shapes(uri, arch, width, state))
    trunk.load_state_dict(state, strict=True)
    return trunk.eval()


class TorchvisionTrunk(nn.Module):
    """A torchvision classifier read as a trunk: ``taps(x, names)`` from named nodes of its graph.

    ResNets (any depth, ResNeXt, wide): conv1 = ``relu``, conv2..conv5 = ``layer1``..``layer4``.
    VGGs: the ReLU before each max pool; AlexNet: the ReLU after each conv. Both: fc6/fc7 = the
    first two ReLUs of ``classifier``. Extraction runs only as deep as the deepest tap asked for.
    """

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__()
        self.arch = name
        self.model = model
        self.nodes = _torchvision_nodes(name, model)
        self._extractors: dict[tuple[str, ...], nn.Module] = {}

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(self.nodes)

    def forward(self, x: Tensor) -> Tensor:
        return self.taps(x, ["conv5"])["conv5"]

    def taps(self, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        unknown = [n for n in names if n not in self.nodes]
        if unknown:
            raise KeyError(f"{self.arch} has no tap {unknown}; taps: {', '.join(self.nodes)}")
        key = tuple(names)
        if key not in self._extractors:
            from torchvision.models.feature_extraction import create_feature_extractor

            self._extractors[key] = create_feature_extractor(self.model, {self.nodes[n]: n for n in key})
        extractor = self._extractors[key]
        extractor.train(self.training)  # a graph module apart from self.model: follow its mode
        return extractor(x)


def _torchvision_nodes(name: str, model: nn.Module) -> dict[str, str]:
    def relus(seq: nn.Module) -> list[int]:
        return [i for i, m in enumerate(seq) if isinstance(m, nn.ReLU)]

    if isinstance(model, torchvision.models.ResNet):
        return dict(_RESNET_TAP_NODES)
    if isinstance(model, torchvision.models.VGG | torchvision.models.AlexNet):
        f = model.features
        if isinstance(model, torchvision.models.AlexNet):
            conv = relus(f)
        else:
            conv = [i for i in relus(f) if i + 1 < len(f) and isinstance(f[i + 1], nn.MaxPool2d)]
        fc = relus(model.classifier)[:2]
        return {**{t: f"features.{i}" for t, i in zip(CONV_TAPS, conv, strict=True)},
                **{t: f"classifier.{i}" for t, i in zip(FC_TAPS, fc, strict=True)}}
    raise ValueError(f"torchvision:{name}: taps are defined for torchvision's ResNet, VGG and AlexNet families")


# --------------------------------------------------------------------------- frozen trunks and inputs



def build_random_trunk(spec: str, width: float, seed: int) -> Any:
    """``random:<arch>[:<width>]``: a randomly initialised trunk (the paper's "random" floor), seeded.

    The same seed gives the same weights in every extraction actor and in every run.
    """

    arch, width = parse_random_trunk(spec, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_trunk(arch, width).eval()


def build_torchvision_trunk(spec: str, seed: int) -> TorchvisionTrunk:
    """``torchvision:<name>``: torchvision's own model of that name, randomly initialised (seeded), as a trunk.

    Built with ``weights=None``: nothing is downloaded. Trained weights go through a weights file.
    """
    name = spec[len(TORCHVISION_TRUNK) :]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None)
    return TorchvisionTrunk(name, model).eval()


def load_any_trunk(trunk: Any, width: float = 1.0, seed: int = 0) -> Any:
    """A frozen trunk (eval mode, no gradients) from a weights URI (:func:`read_trunk`), a ``random:`` or
    ``torchvision:`` spec, or a module."""

    if isinstance(trunk, str):
        if trunk.startswith(RANDOM_TRUNK):
            module = build_random_trunk(trunk, width, seed)
        elif trunk.startswith(TORCHVISION_TRUNK):
            module = build_torchvision_trunk(trunk, seed)
        else:
            module = read_trunk(trunk)
    else:
        module = trunk
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def trunk_key(trunk: str, width: float, seed: int) -> str:
    """Identity of a trunk for the run directory: the content hash of its weights file."""

    if trunk.startswith(RANDOM_TRUNK):
        return "trunk-" + config_hash(trunk, width, seed)
    if trunk.startswith(TORCHVISION_TRUNK):  # the width is the model's own
        return "trunk-" + config_hash(trunk, seed)
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
