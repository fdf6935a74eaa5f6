"""Jigsaw++ puzzles (Noroozi et al. 2016, 2018): permutation sets and a vectorised puzzle builder.

Pure numpy: nothing here imports torch or Ray, so every rule can be unit tested directly.

A puzzle is a 3x3 grid of tiles cut from a random crop of one image, shown in the order of
one permutation of a fixed set; the network predicts the permutation's index (2016, Sec. 3).
Jigsaw++ (Noroozi et al. 2018) replaces 0..``max_foreign`` of the tiles with tiles of another image
and keeps the label, so the task cannot be solved by matching edges alone.

Conventions (used by every stage that loads ``permutations.npy``):

- Grid cells are numbered row-major, 0..8.
- ``perms[label]`` is a tuple ``p`` of 9 cell indices: output position ``i`` shows the tile
  of cell ``p[i]``. Undo it with ``original[p] = shuffled``.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ktray.config import PretextConfig


GRID = 3


CELLS = GRID * GRID


# ITU-R 601 luma weights, the same as PIL's convert("L").
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


class PermutationError(ValueError):
    """The requested permutation set cannot be built (too many for the minimum distance)."""


def all_permutations() -> np.ndarray:
    """All 9! = 362880 permutations of the 3x3 grid, (362880, 9) uint8, lexicographic."""
    return np.asarray(list(itertools.permutations(range(CELLS))), dtype=np.uint8)


def hamming_matrix(perms: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (number of positions that differ), (N, N) int."""
    perms = np.asarray(perms)
    return (perms[:, None, :] != perms[None, :, :]).sum(-1)


def generate_permutations(n: int, min_hamming: int = 3, seed: int = 0) -> np.ndarray:
    """``n`` permutations of the 3x3 grid chosen greedily by the max-min Hamming rule.

    Each new permutation is the one whose *minimum* distance to those already chosen is
    largest: Algorithm 1 of Noroozi & Favaro (2016, Sec. 3.2) with its average distance replaced
    by the minimum, since only max-min guarantees a floor. The first pick is random; ties are broken in a
    seeded random order, so the set is a deterministic function of ``(n, min_hamming, seed)``.
    The identity is excluded, as in the authors' release. With ``min_hamming = 3`` a puzzle
    with up to 2 foreign tiles still matches exactly one permutation (Jigsaw++, 2018).

    Raises :class:`PermutationError` when the search cannot place ``n`` permutations at
    pairwise distance >= ``min_hamming``. Returns (n, 9) int64.
    """
    if n < 1:
        raise PermutationError(f"need at least one permutation, got n={n}")
    if not 1 <= min_hamming <= CELLS:
        raise PermutationError(f"min_hamming must be in 1..{CELLS}, got {min_hamming}")
    rng = np.random.default_rng(seed)
    cands = all_permutations()[1:]  # row 0 is the identity: excluded
    cands = cands[rng.permutation(len(cands))]  # seeded tie-breaking order
    m = len(cands)
    # masks[j, v, c] = 1 where candidate c has value v at position j. The number of
    # positions two permutations share is then a sum of 9 rows, which is ~5x faster than
    # comparing columns (no temporaries): 1000 picks take about a second.
    masks = np.zeros((CELLS, CELLS, m), dtype=np.uint8)
    for j in range(CELLS):
        for v in range(CELLS):
            masks[j, v] = cands[:, j] == v
    # shared[c] = max over chosen of positions shared with c = 9 - (min distance to the set).
    shared = np.zeros(m, dtype=np.uint8)
    chosen = np.empty(n, dtype=np.int64)
    max_shared = CELLS - min_hamming
    for k in range(n):
        c = 0 if k == 0 else int(np.argmin(shared))
        if shared[c] > max_shared:
            raise PermutationError(
                f"cannot choose {n} permutations of the 3x3 grid with pairwise Hamming distance "
                f">= {min_hamming}: the greedy max-min search ran out after {k} (seed {seed}); "
                f"lower pretext.num_permutations or pretext.min_hamming"
            )
        chosen[k] = c
        p = cands[c]
        eq = masks[0, p[0]].copy()
        for j in range(1, CELLS):
            eq += masks[j, p[j]]
        np.maximum(shared, eq, out=shared)
    return cands[chosen].astype(np.int64)


def check_permutations(perms: np.ndarray, min_hamming: int = 1) -> np.ndarray:
    """Validate a loaded permutation set: (N, 9) permutations of 0..8, distinct, >= min distance."""
    perms = np.asarray(perms)
    if perms.ndim != 2 or perms.shape[1] != CELLS:
        raise PermutationError(f"expected an (N, {CELLS}) array of permutations, got shape {perms.shape}")
    if not (np.sort(perms, axis=1) == np.arange(CELLS)).all():
        raise PermutationError(f"every row must be a permutation of 0..{CELLS - 1}")
    if len(perms) > 1:
        d = hamming_matrix(perms)
        np.fill_diagonal(d, CELLS)
        if d.min() < min_hamming:
            raise PermutationError(f"two permutations are only {d.min()} apart (need >= {min_hamming})")
    return perms.astype(np.int64)


@dataclass(frozen=True)
class PuzzleSpec:
    """Geometry and augmentation of one puzzle (paper: 225 px crop, 75 px cells, 64 px tiles)."""

    crop: int = 225
    tile: int = 64
    max_foreign: int = 2
    grey_prob: float = 0.5
    channel_shift: int = 2
    color_jitter: float = 0.0
    normalize: bool = True

    @property
    def cell(self) -> int:
        return self.crop // GRID

    def check(self) -> None:
        if self.tile + self.channel_shift > self.cell:
            raise ValueError(
                f"tile ({self.tile}) + channel_shift ({self.channel_shift}) must fit in a cell "
                f"of crop // 3 = {self.cell} px"
            )
        if not 0 <= self.max_foreign <= CELLS - 1:
            raise ValueError(f"max_foreign must be in 0..{CELLS - 1}, got {self.max_foreign}")

    @classmethod
    def from_config(cls, cfg: PretextConfig) -> PuzzleSpec:
        return cls(
            crop=cfg.crop,
            tile=cfg.tile,
            max_foreign=cfg.max_foreign,
            grey_prob=cfg.grey_prob,
            channel_shift=cfg.channel_shift,
            color_jitter=cfg.color_jitter,
        )


def make_puzzles(
    images: np.ndarray, perms: np.ndarray, rng: np.random.Generator, spec: PuzzleSpec
) -> dict[str, np.ndarray]:
    """Build one Jigsaw++ puzzle per image, vectorised over the batch.

    ``images``: (B, S, S, 3) uint8 with S >= ``spec.crop``. Per puzzle (2016 Sec. 3.1-3.3; Jigsaw++ 2018):

    1. a random ``crop``-px square, split into a 3x3 grid of ``crop // 3`` px cells;
    2. in each cell a ``tile``-px tile at a random offset (jitter: no edge continuity to exploit),
       each colour channel shifted by 0..``channel_shift`` px on its own (against the chromatic
       aberration shortcut of the 2016 paper, Sec. 3.3);
    3. a random permutation of the set: output position ``i`` shows cell ``perms[label][i]``;
    4. Jigsaw++: ``n ~ U{0..max_foreign}`` distinct random positions show instead a tile from a
       random cell of *another image of the same batch* (row ``b + U{1..B-1} mod B``, so never
       the puzzle's own image); the label is unchanged. A batch of one image gets no foreign tiles;
    5. per-tile, per-channel gain jitter in ``[1 - color_jitter, 1 + color_jitter]``, then
       greyscale for a ``grey_prob`` fraction of puzzles (all 9 tiles, foreign ones included, so
       colour never tells them apart), then each tile normalised to zero mean and unit variance
       on its own (``normalize``; flat tiles are divided by at most 1 grey level, not blown up).

    Returns ``tiles`` (B, 9, 3, tile, tile) float32, ``label`` (B,) int64 and, for tests and
    statistics, ``foreign`` (B, 9) bool, ``source`` (B, 9) int64 (batch row each tile was cut from),
    ``cell`` (B, 9) int64 (its grid cell there), ``origin`` (B, 9, 3, 2) int64 ((y, x) of each
    tile channel in its source image) and ``crop`` (B, 2) int64 ((y, x) of each image's crop).
    """
    spec.check()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected (B, S, S, 3) images, got {images.shape}")
    b, s = images.shape[0], images.shape[1]
    if s < spec.crop:
        raise ValueError(f"images of {s} px are smaller than the {spec.crop} px crop")
    perms = np.asarray(perms, dtype=np.int64)
    t, cell, shift = spec.tile, spec.cell, spec.channel_shift
    rows = np.arange(b)

    # Geometry of every (image, cell, channel): where its tile starts in the image.
    crop = rng.integers(0, s - spec.crop + 1, size=(b, 2))  # (B, 2) y, x
    grid = np.stack(np.divmod(np.arange(CELLS), GRID), axis=-1) * cell  # (9, 2) cell corners
    jitter = rng.integers(0, cell - t - shift + 1, size=(b, CELLS, 1, 2))  # (B, 9, 1, 2)
    chan = rng.integers(0, shift + 1, size=(b, CELLS, 3, 2))  # (B, 9, 3, 2)
    corner = crop[:, None, None, :] + grid[None, :, None, :] + jitter + chan  # (B, 9, 3, 2)

    # Which tile each output position shows: the permuted own cells, then the foreign ones.
    label = rng.integers(0, len(perms), size=b)  # (B,)
    source = np.repeat(rows[:, None], CELLS, axis=1)  # (B, 9)
    cells = perms[label]  # (B, 9)
    n_foreign = rng.integers(0, spec.max_foreign + 1, size=b) if b > 1 else np.zeros(b, np.int64)
    # Distinct positions: the n smallest of 9 random keys (rank < n).
    rank = np.argsort(np.argsort(rng.random((b, CELLS)), axis=1), axis=1)
    foreign = rank < n_foreign[:, None]  # (B, 9)
    other = (rows + rng.integers(1, max(b, 2), size=b)) % max(b, 1)  # (B,) never the own row
    source = np.where(foreign, other[:, None], source)
    cells = np.where(foreign, rng.integers(0, CELLS, size=(b, CELLS)), cells)

    # One fancy-indexing gather cuts every tile of every channel: (B, 9, 3, t, t) uint8.
    origin = corner[source, cells]  # (B, 9, 3, 2)
    ar = np.arange(t)
    ys = origin[..., 0, None] + ar  # (B, 9, 3, t)
    xs = origin[..., 1, None] + ar  # (B, 9, 3, t)
    tiles = images[
        source[:, :, None, None, None],
        ys[:, :, :, :, None],
        xs[:, :, :, None, :],
        np.arange(3)[None, None, :, None, None],
    ].astype(np.float32)  # (B, 9, 3, t, t)

    if spec.color_jitter > 0:
        gain = rng.uniform(1 - spec.color_jitter, 1 + spec.color_jitter, size=(b, CELLS, 3, 1, 1))
        tiles *= gain.astype(np.float32)
    grey = rng.random(b) < spec.grey_prob  # (B,)
    if grey.any():
        luma = np.einsum("bkchw,c->bkhw", tiles[grey], _LUMA)  # (G, 9, t, t)
        tiles[grey] = luma[:, :, None]
    if spec.normalize:
        mean = tiles.mean(axis=(2, 3, 4), keepdims=True)
        std = tiles.std(axis=(2, 3, 4), keepdims=True)
        tiles -= mean
        tiles /= np.maximum(std, 1.0)
    return {
        "tiles": tiles,
        "label": label.astype(np.int64),
        "foreign": foreign,
        "source": source.astype(np.int64),
        "cell": cells.astype(np.int64),
        "origin": origin.astype(np.int64),
        "crop": crop.astype(np.int64),
        "grey": grey,
    }


def unshuffle(tiles: np.ndarray, perms: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Undo the permutation: (B, 9, ...) puzzle tiles -> tiles in grid-cell order."""
    order = np.asarray(perms)[np.asarray(label)]  # (B, 9)
    out = np.empty_like(tiles)
    out[np.arange(len(tiles))[:, None], order] = tiles
    return out


def batch_seed(seed: int, image_ids: Any) -> list[int]:
    """A seed for one batch: the same for the same ``seed`` and rows, different across batches."""
    return [seed, zlib.crc32("\n".join(str(i) for i in image_ids).encode())]
