"""Embed: the pooling and whitening math, and the Ray Data stage on the bundled sample."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from workloads import random_teacher

from ktray import schema
from ktray.algos.whitening import apply_pca, fit_pca_whitening, l2_normalize
from ktray.config import Config, replace
from ktray.data.decode import decode_image
from ktray.data.shards import load_table
from ktray.models.trunks import build_trunk, load_trunk, standardise, tap_shapes
from ktray.rundir import StageDir
from ktray.schema import features_to_numpy
from ktray.stages import embed


def test_standardise_gives_each_image_zero_mean_unit_variance() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    pixels[2] = 7  # a flat image: std 0, floored at 1 (as the teacher's tiles)
    x = standardise(pixels)
    assert x.shape == (3, 3, 20, 20)
    torch.testing.assert_close(x.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:2].std(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    assert torch.all(x[2] == 0)


def test_embed_pixels_max_pools_the_tap_to_the_grid() -> None:
    torch.manual_seed(0)
    trunk = build_trunk("vgg16", 0.125).eval()
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = embed.embed_pixels(trunk, pixels, "conv4", 2)
    c, h, w = tap_shapes("vgg16", 0.125, 32)["conv4"]  # (64, 4, 4)
    assert got.shape == (2, c * 4)
    with torch.no_grad():
        act = trunk.taps(standardise(pixels), ["conv4"])["conv4"]  # (2, C, 4, 4)
    # Each of the 2x2 cells is the max over a 2x2 block of the tap, channel-major when flattened.
    blocks = act.reshape(2, c, 2, h // 2, 2, w // 2).amax(dim=(3, 5))  # (2, C, 2, 2)
    np.testing.assert_allclose(got, blocks.reshape(2, -1).numpy(), rtol=1e-6)


def test_pca_whitening_decorrelates_and_matches_sklearn() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)) + 3).astype(np.float32)
    pca = fit_pca_whitening(x, 5, seed=0)
    z = apply_pca(x, pca)
    assert z.shape == (500, 5)
    np.testing.assert_allclose(np.cov(z.T.astype(np.float64)), np.eye(5), atol=1e-3)
    ref = PCA(5, whiten=True, random_state=0).fit_transform(x.astype(np.float64))
    np.testing.assert_allclose(np.abs(z), np.abs(ref), rtol=1e-3, atol=1e-3)  # up to each axis' sign
    with pytest.raises(ValueError, match="pca_dim"):
        fit_pca_whitening(x[:4], 5)


def _read_features(sd: StageDir) -> tuple[list[str], np.ndarray, int]:
    table = pq.read_table(sd.path("features"))
    dim = schema.feature_dim(table.schema)
    return table["image_id"].to_pylist(), features_to_numpy(table["feature"]), dim


def test_embed_stage_one_row_per_image(ray_session: None, sample_shards: str, run_root: str) -> None:
    teacher = random_teacher(run_root)
    cfg = replace(Config(root=run_root), [
        "data.limit=48", "embed.image_size=64", "embed.grid=2", "embed.batch_size=16", "compute.device=cpu",
    ])
    sd = embed.run(cfg, teacher)
    assert sd.done()
    ids, x, dim = _read_features(sd)
    channels = tap_shapes("alexnet", 0.25, 64)["conv4"][0]
    assert dim == channels * 2 * 2 == embed.feature_dim(cfg, "alexnet", 0.25)
    assert len(ids) == len(set(ids)) == 48
    images = load_table(sample_shards, split="train")
    assert set(ids) <= set(images["image_id"].to_pylist())
    assert np.isfinite(x).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-5)
    assert sd.manifest()["metrics"]["summary"]["rows"] == 48
    # The stream computes what the model computes on the driver for the same image.
    by_id = dict(zip(images["image_id"].to_pylist(), images["image"].to_pylist()))
    trunk = load_trunk(teacher.path("teacher.pt"))
    pixels = np.stack([decode_image(by_id[i], 64) for i in ids[:4]])
    direct = l2_normalize(embed.embed_pixels(trunk, pixels, "conv4", 2))
    np.testing.assert_allclose(x[:4], direct, rtol=1e-4, atol=1e-6)
    assert embed.run(cfg, teacher) == sd  # done: skipped


@pytest.mark.slow
def test_embed_stage_with_pca_whitening(ray_session: None, run_root: str) -> None:
    teacher = random_teacher(run_root, seed=1)
    cfg = replace(Config(root=run_root), [
        "data.limit=40", "embed.image_size=64", "embed.grid=2", "embed.pca_dim=8", "embed.pca_sample=32",
        "compute.device=cpu",
    ])
    sd = embed.run(cfg, teacher)
    ids, x, dim = _read_features(sd)
    assert dim == 8 == embed.feature_dim(cfg, "alexnet", 0.25)
    assert len(set(ids)) == len(ids) == 40
    assert np.isfinite(x).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-5)
    pca = embed.load_pca(sd.path("pca.npz"))
    assert pca["proj"].shape == (tap_shapes("alexnet", 0.25, 64)["conv4"][0] * 4, 8)
