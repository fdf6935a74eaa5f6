"""Jigsaw++ permutation sets and puzzles: pure numpy, no Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ktray.algos import jigsaw as J
from ktray.data.shards import load_table
from ktray.methods.jigsaw import puzzle_batch


def _sigma_bound(n: int, p: float) -> float:
    """Five binomial standard deviations: a bound a correct sampler misses ~1 time in 1.7 million."""
    return 5 * np.sqrt(n * p * (1 - p))


# --------------------------------------------------------------------------- permutations


def test_1000_permutations_at_distance_3_are_far_apart_deterministic_and_fast() -> None:
    t0 = time.perf_counter()
    perms = J.generate_permutations(1000, min_hamming=3, seed=0)
    elapsed = time.perf_counter() - t0
    assert perms.shape == (1000, 9)
    assert (np.sort(perms, axis=1) == np.arange(9)).all()  # every row is a permutation
    d = J.hamming_matrix(perms)
    np.fill_diagonal(d, 9)
    assert d.min() >= 3  # every pair differs in at least the minimum distance
    assert not (perms == np.arange(9)).all(axis=1).any()  # identity excluded, as in the release
    assert np.array_equal(perms, J.generate_permutations(1000, min_hamming=3, seed=0))
    assert not np.array_equal(perms, J.generate_permutations(1000, min_hamming=3, seed=1))
    assert elapsed < 30, f"greedy search took {elapsed:.1f}s"


@pytest.mark.parametrize(("n", "d"), [(701, 3), (100, 5), (2, 9)])
def test_sets_meet_their_floor(n: int, d: int) -> None:
    perms = J.generate_permutations(n, min_hamming=d, seed=3)
    assert len(perms) == n
    assert np.array_equal(J.check_permutations(perms, d), perms)


def test_max_min_rule_spreads_further_than_the_floor() -> None:
    # Max-min picks the farthest candidate each time, so a small set sits well above the floor.
    perms = J.generate_permutations(50, min_hamming=3)
    d = J.hamming_matrix(perms)
    np.fill_diagonal(d, 9)
    assert d.min() > 3


def test_impossible_request_fails_clearly() -> None:
    # Permutations at pairwise distance 9 disagree everywhere: at most 9 exist (Latin-square rows).
    with pytest.raises(J.PermutationError, match=r"cannot choose 20 permutations.*distance >= 9.*ran out after"):
        J.generate_permutations(20, min_hamming=9)
    with pytest.raises(J.PermutationError):
        J.generate_permutations(10, min_hamming=0)


def test_check_permutations_refuses_bad_sets() -> None:
    good = J.generate_permutations(10, 3)
    with pytest.raises(J.PermutationError):
        J.check_permutations(good[:, :8])
    bad = good.copy()
    bad[0, 0] = bad[0, 1]
    with pytest.raises(J.PermutationError):
        J.check_permutations(bad)
    close = np.stack([np.arange(9), np.r_[1, 0, 2:9]])  # distance 2
    with pytest.raises(J.PermutationError, match="only 2 apart"):
        J.check_permutations(close, 3)


# --------------------------------------------------------------------------- puzzles


def _noise(b: int, s: int, seed: int = 0) -> np.ndarray:
    # Random pixels: every tile is unique, so a tile can be traced back to where it was cut.
    return np.random.default_rng(seed).integers(0, 256, size=(b, s, s, 3), dtype=np.uint8)


RAW = {"grey_prob": 0.0, "color_jitter": 0.0, "normalize": False}


def test_undoing_the_permutation_gives_back_the_crop_exactly() -> None:
    # Tiles as large as cells and no channel shift: the 9 tiles tile the crop, nothing else.
    images = _noise(16, 64)
    perms = J.generate_permutations(30, 3)
    spec = J.PuzzleSpec(crop=48, tile=16, max_foreign=0, channel_shift=0, **RAW)
    out = J.make_puzzles(images, perms, np.random.default_rng(0), spec)
    assert out["tiles"].shape == (16, 9, 3, 16, 16) and out["tiles"].dtype == np.float32
    assert not out["foreign"].any()
    cells = J.unshuffle(out["tiles"], perms, out["label"])  # (B, 9, 3, 16, 16) in grid order
    grid = cells.reshape(16, 3, 3, 3, 16, 16).transpose(0, 1, 4, 2, 5, 3).reshape(16, 48, 48, 3)
    for b in range(16):
        y, x = out["crop"][b]
        assert np.array_equal(grid[b], images[b, y : y + 48, x : x + 48])
    # The puzzle itself is shuffled (the labels are not all the identity-free no-op).
    assert (cells != out["tiles"]).any()


def test_jittered_tiles_come_from_their_cells_with_per_channel_shifts() -> None:
    images = _noise(12, 80, seed=1)
    perms = J.generate_permutations(50, 3)
    spec = J.PuzzleSpec(crop=75, tile=19, max_foreign=0, channel_shift=2, **RAW)  # cells of 25 px
    out = J.make_puzzles(images, perms, np.random.default_rng(1), spec)
    cells = J.unshuffle(out["tiles"], perms, out["label"])
    origin = J.unshuffle(out["origin"], perms, out["label"])  # (B, 9, 3, 2)
    for b in range(12):
        for k in range(9):
            for c in range(3):
                y, x = origin[b, k, c]
                assert np.array_equal(cells[b, k, c], images[b, y : y + 19, x : x + 19, c])
                # The tile (with its shift) lies inside cell k of the crop.
                rel = origin[b, k, c] - out["crop"][b] - np.array(divmod(k, 3)) * 25
                assert (rel >= 0).all() and (rel + 19 <= 25).all()
    shifts = out["origin"] - out["origin"][:, :, :1]  # channel offsets relative to red
    assert shifts.min() >= -2 and shifts.max() <= 2 and (shifts != 0).any()


@pytest.mark.parametrize("max_foreign", [0, 2, 4])
def test_foreign_tile_count_and_positions_follow_the_distribution(max_foreign: int) -> None:
    perms = J.generate_permutations(20, 3)
    spec = J.PuzzleSpec(crop=24, tile=8, max_foreign=max_foreign, channel_shift=0, **RAW)
    rng = np.random.default_rng(2)
    images = _noise(32, 24, seed=2)
    foreign = np.concatenate([J.make_puzzles(images, perms, rng, spec)["foreign"] for _ in range(300)])
    n = len(foreign)  # 9600 puzzles
    counts = np.bincount(foreign.sum(1), minlength=10)
    assert counts[max_foreign + 1 :].sum() == 0
    p = 1 / (max_foreign + 1)  # uniform over 0..max_foreign
    for c in counts[: max_foreign + 1]:
        assert abs(c - n * p) <= _sigma_bound(n, p), counts
    # Positions: every one of the 9 equally likely (distinct positions per puzzle by construction).
    total = foreign.sum()
    if total:
        per_position = foreign.sum(0)
        for c in per_position:
            assert abs(c - total / 9) < _sigma_bound(total, 1 / 9), per_position


def test_foreign_tiles_come_from_a_different_image() -> None:
    images = _noise(10, 40, seed=3)
    perms = J.generate_permutations(20, 3)
    spec = J.PuzzleSpec(crop=36, tile=10, max_foreign=2, channel_shift=1, **RAW)
    out = J.make_puzzles(images, perms, np.random.default_rng(3), spec)
    rows = np.arange(10)[:, None]
    assert (out["source"][out["foreign"]] != np.broadcast_to(rows, (10, 9))[out["foreign"]]).all()
    assert (out["source"][~out["foreign"]] == np.broadcast_to(rows, (10, 9))[~out["foreign"]]).all()
    assert out["foreign"].any()
    for b, i in zip(*np.nonzero(out["foreign"])):
        src = out["source"][b, i]
        for c in range(3):
            y, x = out["origin"][b, i, c]
            assert np.array_equal(out["tiles"][b, i, c], images[src, y : y + 10, x : x + 10, c])
    # A single image cannot lend itself a foreign tile: none are placed.
    single = J.make_puzzles(images[:1], perms, np.random.default_rng(0), spec)
    assert not single["foreign"].any()


def test_greyscale_fraction_colour_jitter_and_per_tile_normalisation() -> None:
    images = _noise(64, 40, seed=4)
    perms = J.generate_permutations(20, 3)
    spec = J.PuzzleSpec(crop=36, tile=10, grey_prob=0.5, color_jitter=0.3)
    rng = np.random.default_rng(4)
    outs = [J.make_puzzles(images, perms, rng, spec) for _ in range(20)]
    grey = np.concatenate([o["grey"] for o in outs])
    assert abs(grey.sum() - len(grey) / 2) < _sigma_bound(len(grey), 0.5)
    for o in outs:
        t = o["tiles"]
        g = o["grey"]
        assert np.allclose(t[g, :, 0], t[g, :, 1]) and np.allclose(t[g, :, 1], t[g, :, 2])
        assert not np.allclose(t[~g, :, 0], t[~g, :, 1])
        np.testing.assert_allclose(t.mean(axis=(2, 3, 4)), 0, atol=1e-4)
        np.testing.assert_allclose(t.std(axis=(2, 3, 4)), 1, atol=1e-3)


def test_labels_cover_the_set_uniformly() -> None:
    perms = J.generate_permutations(5, 3)
    spec = J.PuzzleSpec(crop=24, tile=8, channel_shift=0)
    rng = np.random.default_rng(5)
    labels = np.concatenate([J.make_puzzles(_noise(50, 24), perms, rng, spec)["label"] for _ in range(60)])
    counts = np.bincount(labels, minlength=5)
    for c in counts:
        assert abs(c - len(labels) / 5) < _sigma_bound(len(labels), 1 / 5)


def test_geometry_errors_are_clear() -> None:
    perms = J.generate_permutations(5, 3)
    with pytest.raises(ValueError, match="must fit in a cell"):
        J.make_puzzles(_noise(2, 64), perms, np.random.default_rng(), J.PuzzleSpec(crop=48, tile=16, channel_shift=1))
    with pytest.raises(ValueError, match="smaller than the 48 px crop"):
        J.make_puzzles(_noise(2, 40), perms, np.random.default_rng(), J.PuzzleSpec(crop=48, tile=12))


def test_puzzle_batch_decodes_real_images_and_seeds_val_puzzles(sample_shards: str) -> None:
    table = load_table(sample_shards, "train").slice(0, 12)
    batch = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in ("image_id", "image", "label")}
    perms = J.generate_permutations(10, 3)
    spec = J.PuzzleSpec(crop=96, tile=28, channel_shift=2)
    kw = {"perms": perms, "spec": spec, "image_size": 128}
    a = puzzle_batch(batch, seed=7, repeats=2, **kw)
    assert a["tiles"].shape == (24, 9, 3, 28, 28) and a["label"].shape == (24,)
    b = puzzle_batch(batch, seed=7, repeats=2, **kw)
    assert np.array_equal(a["tiles"], b["tiles"]) and np.array_equal(a["label"], b["label"])
    c = puzzle_batch(batch, seed=None, **kw)
    d = puzzle_batch(batch, seed=None, **kw)
    assert not np.array_equal(c["tiles"], d["tiles"])  # training: fresh puzzles every call
