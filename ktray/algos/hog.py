"""HOG bag-of-words features: the paper's non-learned "CC+HOG" baseline (Sec. 5, Table 4).

Clustering HOG instead of a teacher's conv4 tells how much of the transfer comes from the
teacher's knowledge and how much from clustering at all. Each image becomes a histogram of
visual words:

    image ──► HOG blocks ──► nearest word ──► histogram ──► sqrt(L1-normalised)
    (S,S,3)   (M, 4*9)       of a k-means      (V,)          (V,): features table
                             vocabulary (V, 36)

The ``hog`` stage (``ktray.stages.hog``) writes the histograms as a features table, the embed
stage's contract, so the cluster stage takes either unchanged.
"""

from __future__ import annotations

import zlib

import numpy as np

# Dalal & Triggs' HOG defaults: 9 unsigned orientations, 8 px cells, 2x2-cell blocks.
ORIENTATIONS = 9


CELL = 8


BLOCK = 2


def hog_descriptors(
    pixels: np.ndarray, orientations: int = ORIENTATIONS, cell: int = CELL, block: int = BLOCK
) -> np.ndarray:
    """Dense HOG block descriptors of one RGB image: ``(M, block*block*orientations)`` float32.

    Every (overlapping, stride one cell) block is a local descriptor: the "words" of the
    bag are built from these, not from the whole-image HOG vector, so the histogram does
    not depend on where in the image a pattern appears.
    """
    from skimage.feature import hog

    blocks = hog(
        pixels,
        orientations=orientations,
        pixels_per_cell=(cell, cell),
        cells_per_block=(block, block),
        block_norm="L2-Hys",
        feature_vector=False,
        channel_axis=-1,  # gradient of the strongest channel per pixel, as Dalal & Triggs
    )  # (rows, cols, block, block, orientations)
    return blocks.reshape(-1, block * block * orientations).astype(np.float32)  # (M, d)


def train_vocabulary(descriptors: np.ndarray, words: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """k-means vocabulary ``(words, d)`` of block descriptors (faiss, trained on every sample given)."""
    import faiss

    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if len(x) < words:
        raise ValueError(f"HOG vocabulary: {len(x)} descriptors cannot make {words} words")
    km = faiss.Kmeans(x.shape[1], words, niter=niter, seed=seed, max_points_per_centroid=10**7, verbose=False)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32)


def bow_histograms(descriptors: list[np.ndarray], vocabulary: np.ndarray) -> np.ndarray:
    """One histogram per image: ``(B, words)`` float32, square root of the L1-normalised counts.

    The square root (Hellinger map) makes Euclidean distance between histograms behave like
    the Hellinger distance between word distributions and gives every row unit L2 norm,
    which is what the cluster stage's k-means expects of its features.
    """
    import faiss

    words = len(vocabulary)
    out = np.zeros((len(descriptors), words), dtype=np.float32)
    if not descriptors:
        return out
    allx = np.ascontiguousarray(np.concatenate(descriptors), dtype=np.float32)  # (sum M, d)
    _, nearest = faiss.knn(allx, np.ascontiguousarray(vocabulary, dtype=np.float32), 1)  # (sum M, 1)
    owner = np.repeat(np.arange(len(descriptors)), [len(d) for d in descriptors])  # (sum M,)
    np.add.at(out, (owner, nearest[:, 0]), 1.0)
    out /= np.maximum(out.sum(axis=1, keepdims=True), 1.0)
    return np.sqrt(out)


def _sample_rows(image_id: str, n: int, m: int, seed: int) -> np.ndarray:
    """``m`` of ``n`` descriptor rows, chosen by a seed derived from the image id (order independent)."""
    rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
    return rng.choice(n, size=min(m, n), replace=False)
