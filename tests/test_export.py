"""``ktray export``: every format of every architecture reads back to the same outputs.

Small widths and inputs keep it fast; batch norms get random statistics so that a fold or a
dropped buffer would show. torchvision's own models are built on the meta device and take the
exported tensors by assignment: only the layers a trunk has are ever materialised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ktray import cli
from ktray.config import RANDOM_TRUNK
from ktray.export import FILES, FORMATS, PREPROCESSING, ExportError, export, load_program
from ktray.models.trunks import (
    CONV_TAPS,
    Trunk,
    build_trunk,
    features,
    load_any_trunk,
    read_trunk,
    save_weights,
    tap_shapes,
    trunk_key,
)

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: one thread (two threads' barriers cost 100x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_like(arch: str, width: float, *, fc: bool) -> Trunk:
    """A trunk with random batch-norm statistics and affines, as after training (eval mode)."""
    torch.manual_seed(0)
    trunk = build_trunk(arch, width, fc=fc)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return trunk.eval()


def taps_of(trunk: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return trunk.taps(x, names)


def assert_close(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["alexnet", "vgg16", "resnet18", "resnet50"])
def test_every_format_reads_back_to_the_same_outputs(tmp_path: Path, arch: str) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'ktray[onnx]'")
    fc = arch in ("alexnet", "vgg16")
    trunk = trained_like(arch, 0.125, fc=fc)
    stage = tmp_path / "transfer-0123456789"
    stage.mkdir()
    save_weights(trunk, str(stage / "student.pt"))
    x = torch.randn(3, 3, SIZE, SIZE)
    want = taps_of(trunk, x, trunk.tap_names)
    out = tmp_path / "export"

    for fmt in FORMATS:
        export(str(stage), fmt, out, image_size=SIZE)  # a stage folder: its student.pt

    # torchvision layout: the conv stages, back through ktray's reader (evaluate --trunk).
    back = read_trunk(str(out / FILES["torchvision"]))
    assert (back.arch, back.width, back.has_fc) == (arch, 0.125, False)
    for tap, got in taps_of(back, x, CONV_TAPS).items():
        assert_close(got, want[tap])
    # safetensors: the whole trunk, fc6/fc7 included.
    back = read_trunk(str(out / FILES["safetensors"]))
    for tap, got in taps_of(back, x, trunk.tap_names).items():
        assert_close(got, want[tap])
    # torch.export and ONNX: images -> every tap, in the recorded order, at another batch size.
    record = json.loads((out / PREPROCESSING).read_text())
    names = [o["name"] for o in record["formats"]["pt2"]["outputs"]]
    assert names == list(trunk.tap_names)
    with torch.no_grad():
        program = load_program(out / FILES["pt2"])(x)
    for name, got in zip(names, program, strict=True):
        assert_close(got, want[name])
    session = ort.InferenceSession(str(out / FILES["onnx"]), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    for name, got in zip(names, session.run(None, {"images": x.numpy()}), strict=True):
        assert_close(got, want[name])

    # The record beside the weights: the input rule and the outputs' shapes.
    assert record["arch"] == arch and record["source"].endswith("student.pt")
    assert record["input"]["image_size"] == SIZE
    assert record["input"]["function"] == "ktray.models.trunks.standardise"
    assert set(record["formats"]) == set(FORMATS)
    shapes = tap_shapes(arch, 0.125, SIZE, fc=fc)
    assert all(tuple(o["shape"][1:]) == shapes[o["name"]] for o in record["formats"]["onnx"]["outputs"])


def torchvision_conv5(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own forward up to the last conv stage (before the pooling and classifier)."""
    if isinstance(model, torchvision.models.VGG):
        return model.features[:-1](x)
    m = model
    for layer in (m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4):
        x = layer(x)
    return x


@pytest.mark.parametrize(("arch", "builder", "missing"), [
    ("resnet18", torchvision.models.resnet18, "fc."),
    ("resnet50", torchvision.models.resnet50, "fc."),
    ("vgg16", torchvision.models.vgg16_bn, "classifier."),
])
def test_torchvision_layout_loads_into_torchvision(tmp_path: Path, arch: str, builder, missing: str) -> None:
    trunk = trained_like(arch, 1.0, fc=False)
    save_weights(trunk, str(tmp_path / "teacher.pt"))
    export(str(tmp_path / "teacher.pt"), "torchvision", tmp_path / "out", image_size=32)
    state = torch.load(tmp_path / "out" / FILES["torchvision"], weights_only=True)
    with torch.device("meta"):
        model = builder()
    result = model.load_state_dict(state, strict=False, assign=True)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith(missing) for k in result.missing_keys)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(torchvision_conv5(model.eval(), x), trunk(x))


def test_torchvision_vgg16_bn_weights_read_into_ktray(tmp_path: Path) -> None:
    """torchvision's conv biases fold into ktray's batch norms (what published weights need)."""
    with torch.device("meta"):
        model = torchvision.models.vgg16_bn()
    model.features.to_empty(device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                m.bias.normal_(0, 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.running_mean.normal_(0, 0.5)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    torch.save(state, tmp_path / "vgg16_bn.pth")
    trunk = load_any_trunk(str(tmp_path / "vgg16_bn.pth"))
    assert (trunk.arch, trunk.width) == ("vgg16", 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(trunk(x), model.features[:-1].eval()(x))


def test_alexnet_torchvision_layout_is_the_documented_module(tmp_path: Path) -> None:
    trunk = trained_like("alexnet", 0.25, fc=False)
    save_weights(trunk, str(tmp_path / "teacher.pt"))
    record = export(str(tmp_path), "torchvision", tmp_path / "out", image_size=SIZE)
    module = record["formats"]["torchvision"]["module"]
    assert module["torchvision"] is None and len(module["layers"]) == len(features(trunk))
    documented = features(build_trunk("alexnet", 0.25)).eval()
    holder = nn.ModuleDict({"features": documented})  # the keys are features.<i>, as VGG's
    holder.load_state_dict(torch.load(tmp_path / "out" / FILES["torchvision"], weights_only=True))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert_close(documented(x), trunk(x))


def test_torchvision_spec_builds_a_trunk_with_taps() -> None:
    trunk = load_any_trunk("torchvision:resnet18", seed=0)
    x = torch.randn(2, 3, SIZE, SIZE)
    taps = taps_of(trunk, x, CONV_TAPS)
    assert {k: tuple(v.shape[1:]) for k, v in taps.items()} == tap_shapes("resnet18", 1.0, SIZE)
    assert not any(p.requires_grad for p in trunk.parameters())
    again = taps_of(load_any_trunk("torchvision:resnet18", seed=0), x, ["conv5"])["conv5"]
    other = taps_of(load_any_trunk("torchvision:resnet18", seed=1), x, ["conv5"])["conv5"]
    assert torch.equal(again, taps["conv5"]) and not torch.equal(other, taps["conv5"])
    # A spec names its trunk by the spec and seed; the width is the model's own.
    assert trunk_key("torchvision:resnet18", 1.0, 0) == trunk_key("torchvision:resnet18", 0.5, 0)
    assert trunk_key("torchvision:resnet18", 1.0, 0) != trunk_key("torchvision:resnet18", 1.0, 1)
    assert trunk_key("torchvision:resnet18", 1.0, 0) != trunk_key(f"{RANDOM_TRUNK}resnet18", 1.0, 0)


def test_onnx_without_its_extra_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_weights(build_trunk("resnet18", 0.125), str(tmp_path / "student.pt"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"ktray\[onnx\]"):
        export(str(tmp_path), "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_weights(build_trunk("resnet18", 0.125), str(tmp_path / "student.pt"))
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "student.pt"), "--format", "safetensors", str(out)]) == 0
    assert (out / FILES["safetensors"]).is_file() and (out / PREPROCESSING).is_file()
    assert "model.safetensors" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no tap"):
        cli.main(["export", str(tmp_path), "--format", "pt2", "--taps", "fc7", str(out)])
