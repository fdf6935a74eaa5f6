"""HOG bag-of-words features (the CC+HOG baseline): the math, then the stage on the sample."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest

from ktray import schema
from ktray.algos.hog import bow_histograms, hog_descriptors, train_vocabulary
from ktray.config import load_config
from ktray.data.shards import load_table
from ktray.stages import hog


def stripes(size: int, period: int, vertical: bool, phase: int = 0) -> np.ndarray:
    """An RGB image of black and white stripes."""
    line = ((np.arange(size) + phase) // period % 2 * 255).astype(np.uint8)
    img = np.tile(line[None, :], (size, 1)) if vertical else np.tile(line[:, None], (1, size))
    return np.repeat(img[:, :, None], 3, axis=2)


def test_descriptors_are_blocks_of_cells() -> None:
    d = hog_descriptors(stripes(64, 4, vertical=True))
    assert d.shape == (7 * 7, 2 * 2 * 9)  # 8x8 cells of 8 px -> 7x7 overlapping 2x2 blocks
    assert d.dtype == np.float32


def test_words_tell_stripe_orientations_apart() -> None:
    vertical = [stripes(48, 4, True, p) for p in range(3)]
    horizontal = [stripes(48, 4, False, p) for p in range(3)]
    descs = [hog_descriptors(im) for im in vertical + horizontal]
    vocab = train_vocabulary(np.concatenate(descs), words=2, seed=0)
    hist = bow_histograms(descs, vocab)  # (6, 2)
    np.testing.assert_allclose(np.linalg.norm(hist, axis=1), 1.0, rtol=1e-6)
    words = hist.argmax(axis=1)
    # Each orientation maps to one word, and the two orientations to different words.
    assert len(set(words[:3])) == 1 and len(set(words[3:])) == 1 and words[0] != words[3]
    assert (hist.max(axis=1) > 0.99).all()


def test_vocabulary_needs_enough_descriptors() -> None:
    with pytest.raises(ValueError, match="cannot make 10 words"):
        train_vocabulary(np.zeros((5, 36), np.float32), words=10)


def test_hog_stage_writes_a_features_table_for_every_train_image(
    ray_session: None, sample_shards: str, run_root: str
) -> None:
    cfg = load_config(
        None,
        [
            f"root={run_root}",
            "data.limit=120",
            "evaluate.hog_words=16",
            "evaluate.hog_image_size=48",
            "evaluate.hog_vocab_images=40",
        ],
    )
    sd = hog.run(cfg)
    assert sd.done()
    table = pads.dataset(sd.path("features"), format="parquet").to_table()
    assert schema.feature_dim(table.schema) == 16
    schema.check_unique_ids("features", table["image_id"])
    train_ids = set(load_table(sample_shards, "train", ["image_id"])["image_id"].to_pylist())
    ids = set(table["image_id"].to_pylist())
    assert len(ids) == 120 and ids <= train_ids
    feats = np.stack(table["feature"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert np.load(sd.path("vocabulary.npy")).shape == (16, 36)
    assert hog.run(cfg) == sd  # done: found and skipped
