"""Which rows a run uses: the limited subset, the long-tailed subset, the held-out slice.

Pure rules on arrays and Arrow tables (no I/O, no Ray), each defined once: every stage that
needs a subset asks here, so the teacher, the student and the evaluator agree on the rows.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

# A limited run takes the classes in turn, so the first N images of a class-sorted set still span
# every class. The rule's name is part of every limited stage's hash: a folder computed under
# another rule is never reused for this one.
LIMIT_ORDER = "classes-in-turn"


def limited_indices(table: pa.Table, limit: int) -> np.ndarray:
    """Which rows of ``table`` a limited run uses, ascending: the first image of each class, then
    the second of each, and so on (unlabelled rows count as one class). No limit: all."""
    n = table.num_rows
    if not limit or limit >= n:
        return np.arange(n)
    labels = (table["label"].fill_null(-1).to_numpy(zero_copy_only=False) if "label" in table.column_names
              else np.zeros(n, np.int64))
    by_class = np.argsort(labels, kind="stable")  # rows grouped by class, table order within a class
    starts = np.searchsorted(labels[by_class], labels[by_class])  # where each row's class begins
    rank = np.empty(n, np.int64)
    rank[by_class] = np.arange(n) - starts  # the row's place within its class
    return np.sort(np.lexsort((np.arange(n), rank))[:limit])


def limited_rows(table: pa.Table, limit: int) -> pa.Table:
    """The rows of ``table`` a limited run uses (:func:`limited_indices`), in table order."""
    return table if not limit or limit >= table.num_rows else table.take(pa.array(limited_indices(table, limit)))


def long_tail_counts(sizes: np.ndarray, ratio: float, order: np.ndarray) -> np.ndarray:
    """Images kept per class, ``(C,)``: the ``i``-th class of ``order`` keeps ``n * r**i``, ``r = ratio**(-1/(C-1))``.

    ``n`` is the largest class's size, so the head class keeps everything and the last class
    ``n / ratio`` (at least 1); no class keeps more than it has.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    c = len(sizes)
    if c < 2 or ratio <= 1:
        return sizes.copy()
    r = float(ratio) ** (-1.0 / (c - 1))
    want = np.empty(c, dtype=np.int64)
    want[order] = np.maximum(1, np.floor(sizes.max() * r ** np.arange(c) + 1e-9)).astype(np.int64)
    return np.minimum(want, sizes)


def long_tail_mask(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Which rows of a labelled split form its long-tailed subset (a seeded, deterministic choice).

    Classes are ranked by a seeded permutation (so the head class is not always class 0),
    each keeps :func:`long_tail_counts` of its images chosen at random; unlabelled rows
    (label < 0) have no class and are dropped. The labels choose the subset and nothing else.
    """
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        return keep
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))
    sizes = np.array([(labels == c).sum() for c in classes])
    counts = long_tail_counts(sizes, ratio, order)
    for c, n in zip(classes, counts, strict=True):
        rows = np.flatnonzero(labels == c)
        keep[rng.choice(rows, size=int(n), replace=False)] = True
    return keep


def is_held_out(image_ids: list[str] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each image is held out: a seeded hash of its id, so the split ignores row order."""
    if fraction <= 0:
        return np.zeros(len(image_ids), dtype=bool)
    salt = f"{seed}:".encode()
    h = np.fromiter((zlib.crc32(salt + str(i).encode()) for i in image_ids), dtype=np.uint64, count=len(image_ids))
    return h < np.uint64(int(fraction * 2**32))
