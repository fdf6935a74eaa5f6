"""Trunks out of ktray: torchvision state dicts, safetensors, ``torch.export`` (.pt2) and ONNX.

``export(src, fmt, out)`` reads a weights file (``teacher.pt``, ``student.pt``) or the stage
folder holding one and writes ``out/<FILES[fmt]>`` plus ``out/preprocessing.json``: the input
rule (image size, ``ktray.models.trunks.standardise``), the architecture and, per format, the
outputs. Formats:

- ``torchvision``: the conv stages under torchvision's key names (``torch.save`` of a dict of
  tensors; see ``ktray.models.trunks``: ResNets and VGG16-BN load into torchvision's own models,
  AlexNet-BN into the documented ``features`` module). fc6/fc7 are not included.
- ``safetensors``: the whole trunk under ktray's key names, ``arch`` and ``width`` in the metadata.
- ``pt2`` and ``onnx``: a program from standardised images (B, 3, S, S) to the chosen taps, in
  order, with a dynamic batch; ONNX needs the ``onnx`` extra (``pip install 'ktray[onnx]'``).

Every format reads back into ktray: ``evaluate --trunk`` takes the torchvision and safetensors
files; ``load_program`` runs a .pt2.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import Tensor, nn

from ktray.artifacts import EMA_TEACHER, STUDENT, TEACHER
from ktray.models.trunks import Trunk, features, read_trunk, tap_shapes, torchvision_state_dict, torchvision_taps
from ktray.rundir import filesystem, join, read_bytes

FORMATS = ("torchvision", "safetensors", "pt2", "onnx")
FILES = {"torchvision": "model.pth", "safetensors": "model.safetensors", "pt2": "model.pt2", "onnx": "model.onnx"}
PREPROCESSING = "preprocessing.json"
ONNX_EXTRA = "pip install 'ktray[onnx]'"

INPUT_RULE = {
    "layout": "float32 (B, 3, S, S), RGB",
    "resize": "short side to S (bilinear), then the centre S x S square (ktray.data.decode, mode center)",
    "standardise": "each image on its own: x = (x - mean) / max(std, 1), mean and population std over all of "
    "C, H, W of the 0..255 pixel values; no per-channel ImageNet constants",
    "function": "ktray.models.trunks.standardise",
}


class ExportError(Exception):
    """An export that cannot be made; the message says what to change."""


def weights_file(src: str) -> str:
    """``src`` itself, or the weights file in the stage folder ``src`` (student, else teacher)."""
    fs, path = filesystem(src)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return src
    for name in (STUDENT, TEACHER, EMA_TEACHER):
        uri = join(src, name)
        if fs.get_file_info(filesystem(uri)[1]).type == pafs.FileType.File:
            return uri
    raise FileNotFoundError(f"{src}: no {STUDENT}, {TEACHER} or {EMA_TEACHER} in this folder")


class Taps(nn.Module):
    """A trunk as a program: images (B, 3, S, S) -> the named taps, as a tuple in ``names`` order."""

    def __init__(self, trunk: Trunk, names: Sequence[str]) -> None:
        super().__init__()
        self.trunk = trunk
        self.names = tuple(names)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.trunk.taps(x, self.names)
        return tuple(out[n] for n in self.names)


class StaticAdaptiveMaxPool2d(nn.Module):
    """``nn.AdaptiveMaxPool2d`` as slices and maxima, for ONNX (which has no adaptive max pool).

    The windows are adaptive pooling's, ``[floor(i*n/out), ceil((i+1)*n/out))``, computed from the
    traced input size; a rectangle's maximum is its rows' maximum, then its columns'.
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _windows(n: int, out: int) -> list[tuple[int, int]]:
        return [((i * n) // out, -(-(i + 1) * n // out)) for i in range(out)]

    def forward(self, x: Tensor) -> Tensor:
        oh, ow = self.output_size
        x = torch.cat([x[..., a:b, :].amax(-2, keepdim=True) for a, b in self._windows(x.shape[-2], oh)], -2)
        return torch.cat([x[..., a:b].amax(-1, keepdim=True) for a, b in self._windows(x.shape[-1], ow)], -1)


def _onnx_ready(trunk: Trunk) -> Trunk:
    trunk = copy.deepcopy(trunk)
    for parent in trunk.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, StaticAdaptiveMaxPool2d(child.output_size))
    return trunk


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ExportError(f"--format onnx needs the onnx extra ({module} is missing): {ONNX_EXTRA}") from None


def _program(trunk: Trunk, names: Sequence[str], image_size: int) -> torch.export.ExportedProgram:
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(Taps(trunk, names), (example,), dynamic_shapes=({0: batch},))


def export(
    src: str, fmt: str, out: str | Path, *, image_size: int = 224, taps: Sequence[str] | None = None
) -> dict[str, Any]:
    """Write ``src``'s trunk to ``out`` in format ``fmt`` with ``preprocessing.json``; returns that record.

    ``taps``: the outputs of pt2/onnx (default: all of the trunk's, in order). ``out`` may hold
    other formats of the same weights; the record lists every one.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    uri = weights_file(src)
    sha = hashlib.sha256(read_bytes(uri)).hexdigest()
    trunk = read_trunk(uri)
    names = tuple(taps or trunk.tap_names)
    unknown = [n for n in names if n not in trunk.tap_names]
    if unknown:
        raise ExportError(f"{trunk.arch} has no tap {unknown}; taps: {', '.join(trunk.tap_names)}")

    out = Path(out)
    record_path = out / PREPROCESSING
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record and (record.get("sha256"), record["input"]["image_size"]) != (sha, image_size):
        raise ExportError(f"{out} holds an export of other weights or another image size; choose another OUT")
    out.mkdir(parents=True, exist_ok=True)
    target = out / FILES[fmt]
    shapes = tap_shapes(trunk.arch, trunk.width, image_size, fc=trunk.has_fc)
    entry: dict[str, Any] = {"file": target.name}

    if fmt == "torchvision":
        buf = io.BytesIO()
        torch.save(torchvision_state_dict(trunk), buf)
        target.write_bytes(buf.getvalue())
        entry["taps"] = torchvision_taps(trunk)  # tap -> node, e.g. for create_feature_extractor
        entry["module"] = _torchvision_module(trunk)
        if trunk.has_fc:
            entry["left_out"] = "fc6, fc7 (no torchvision counterpart): use safetensors, pt2 or onnx"
    elif fmt == "safetensors":
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in trunk.state_dict().items()}
        target.write_bytes(save(state, metadata={"arch": trunk.arch, "width": repr(trunk.width)}))
        entry["taps"] = list(trunk.tap_names)
        entry["module"] = f"ktray.models.trunks.build_trunk({trunk.arch!r}, {trunk.width!r}, fc={trunk.has_fc})"
    elif fmt == "pt2":
        torch.export.save(_program(trunk, names, image_size), target)
        entry["outputs"] = [{"name": n, "shape": ["B", *shapes[n]]} for n in names]
        entry["load"] = "torch.export.load(path).module()(x) -> tuple of outputs"
    else:
        program = torch.onnx.export(
            _program(_onnx_ready(trunk), names, image_size), input_names=["images"], output_names=list(names),
            dynamo=True, verbose=False, optimize=False,  # onnxruntime fuses the graph when it loads it
        )
        program.save(str(target))
        entry["outputs"] = [{"name": n, "shape": ["B", *shapes[n]]} for n in names]
        entry["input_name"] = "images"

    record = {
        "source": uri,
        "sha256": sha,
        "arch": trunk.arch,
        "width": trunk.width,
        "input": {"image_size": image_size, **INPUT_RULE},
        "formats": {**record.get("formats", {}), fmt: entry},
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _torchvision_module(trunk: Trunk) -> dict[str, Any]:
    """Where the torchvision-format weights load: torchvision's builder, or the documented module's layers."""
    scaled = "" if trunk.width == 1 else f" at width 1; at {trunk.width:g}, its layer recipe with every count scaled"
    if trunk.arch == "vgg16":
        return {"torchvision": f"torchvision.models.vgg16_bn(){scaled}", "missing": "classifier.*"}
    if trunk.arch.startswith("resnet"):
        return {"torchvision": f"torchvision.models.{trunk.arch}(){scaled}", "missing": "fc.*"}
    return {"torchvision": None, "ktray": "ktray.models.trunks.features(trunk) as a module's `features`",
            "layers": [repr(m) for m in features(trunk)]}


def load_program(path: str | Path) -> nn.Module:
    """A .pt2 export as a module: images (B, 3, S, S) -> tuple of taps (``preprocessing.json``'s order)."""
    return torch.export.load(str(path)).module()
