"""The model zoo: documented tap shapes, width multiplier, Jigsaw head, weights files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ktray.models import trunks as M
from ktray.models.heads import build_jigsaw


@pytest.mark.parametrize("arch", M.ARCHS)
def test_every_tap_has_the_documented_shape(arch: str) -> None:
    fc = arch in ("alexnet", "vgg16")
    trunk = M.build_trunk(arch, 1.0, fc=fc).eval()
    with torch.no_grad():
        out = trunk.taps(torch.randn(2, 3, 224, 224), trunk.tap_names)
    shapes = {k: tuple(v.shape[1:]) for k, v in out.items()}
    assert shapes == M.DOCUMENTED_TAPS_224[arch]
    assert M.tap_shapes(arch) == M.DOCUMENTED_TAPS_224[arch]  # the meta-device shortcut agrees
    assert all(v.shape[0] == 2 for v in out.values())


@pytest.mark.parametrize("arch", M.ARCHS)
@pytest.mark.parametrize(("width", "size"), [(0.25, 64), (0.5, 32)])
def test_width_scales_channels_and_tap_shapes_match_a_real_forward(arch: str, width: float, size: int) -> None:
    fc = arch in ("alexnet", "vgg16")
    trunk = M.build_trunk(arch, width, fc=fc).eval()
    with torch.no_grad():
        out = trunk.taps(torch.randn(2, 3, size, size), trunk.tap_names)
    predicted = M.tap_shapes(arch, width, size)
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == predicted
    for tap, full in M.DOCUMENTED_TAPS_224[arch].items():
        assert predicted[tap][0] == M.scaled(full[0], width)
        assert trunk.out_channels(tap) == predicted[tap][0]


def test_taps_run_only_as_deep_as_needed_and_refuse_unknown_names() -> None:
    trunk = M.build_trunk("vgg16", 0.125).eval()
    calls: list[str] = []
    for name, stage in trunk.stages.items():
        stage.register_forward_hook(lambda *_, n=name: calls.append(n))
    out = trunk.taps(torch.randn(1, 3, 32, 32), ["conv2"])
    assert list(out) == ["conv2"] and calls == ["conv1", "conv2"]
    with pytest.raises(KeyError, match="fc6"):
        trunk.taps(torch.randn(1, 3, 32, 32), ["fc6"])  # built without fc layers
    with pytest.raises(ValueError, match="no fc6/fc7"):
        M.build_trunk("resnet18", 0.25, fc=True)
    with pytest.raises(ValueError, match="unknown arch"):
        M.build_trunk("lenet")


@pytest.mark.parametrize("arch", ["alexnet", "resnet18"])
def test_jigsaw_net_is_siamese_and_has_one_output_per_permutation(arch: str) -> None:
    torch.manual_seed(0)
    net = build_jigsaw(arch, 0.25, num_classes=37, tile_dim=16, hidden=32).eval()
    tiles = torch.randn(3, 9, 3, 32, 32)
    logits = net(tiles)
    assert logits.shape == (3, 37)
    # The trunk sees each tile on its own: the same tile anywhere in the puzzle gets the same features.
    with torch.no_grad():
        per_tile = net.tile_fc(net.trunk(tiles.flatten(0, 1))).reshape(3, 9, -1)
        alone = net.tile_fc(net.trunk(tiles[:, 4]))
    torch.testing.assert_close(per_tile[:, 4], alone, rtol=1e-4, atol=1e-5)
    # Order matters to the head: swapping two tiles changes the logits.
    swapped = tiles[:, [1, 0, 2, 3, 4, 5, 6, 7, 8]]
    assert not torch.allclose(net(swapped), logits)
    # Gradients reach the first conv of the shared trunk.
    net.train()
    torch.nn.functional.cross_entropy(net(tiles), torch.tensor([0, 1, 2])).backward()
    first = next(m for m in net.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("arch", "fc"), [("alexnet", True), ("resnet18", False)])
def test_weights_round_trip_with_weights_only(tmp_path: Path, arch: str, fc: bool) -> None:
    torch.manual_seed(1)
    trunk = M.build_trunk(arch, 0.25, fc=fc)
    trunk.train()
    trunk(torch.randn(4, 3, 64, 64))  # move the batch-norm running stats off their defaults
    trunk.eval()
    path = str(tmp_path / "teacher.pt")
    M.save_weights(trunk, path)
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"arch", "width", "state_dict"} and blob["arch"] == arch and blob["width"] == 0.25
    loaded = M.load_trunk(path)
    assert loaded.arch == arch and loaded.width == 0.25 and loaded.has_fc == fc and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        names = trunk.tap_names
        a, b = trunk.taps(x, names), loaded.taps(x, names)
    for n in names:
        torch.testing.assert_close(a[n], b[n])
