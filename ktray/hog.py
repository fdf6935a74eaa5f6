"""HOG bag-of-words features: the paper's non-learned "CC+HOG" baseline (Sec. 5, Table 4).

Clustering HOG instead of a teacher's conv4 tells how much of the transfer comes from the
teacher's knowledge and how much from clustering at all. Each image becomes a histogram of
visual words:

    image ──► HOG blocks ──► nearest word ──► histogram ──► sqrt(L1-normalised)
    (S,S,3)   (M, 4*9)       of a k-means      (V,)          (V,): features table
                             vocabulary (V, 36)

The output is a features table (``ktray.schema.features_schema``) under ``features/``, the
same contract as the embed stage, so the cluster stage takes either unchanged.

Ray sits at the edges: one Ray Data pass samples block descriptors to learn the vocabulary
(faiss k-means on the driver), a second pass turns every image into its histogram.
"""

from __future__ import annotations

import io
import time
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ktray import schema

if TYPE_CHECKING:
    from ktray.config import Config
    from ktray.rundir import StageDir

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


def sample_batch(batch: dict[str, np.ndarray], size: int, per_image: int, seed: int) -> dict[str, np.ndarray]:
    """Ray Data pass 1: decode, HOG, keep ``per_image`` random block descriptors per image."""
    from ktray.data import decode_batch

    dec = decode_batch(batch, size, "center", stage="hog")
    rows = []
    for image_id, pixels in zip(dec["image_id"], dec["pixels"], strict=True):
        d = hog_descriptors(pixels)
        rows.append(d[_sample_rows(str(image_id), len(d), per_image, seed)])
    dim = BLOCK * BLOCK * ORIENTATIONS
    return {"descriptor": np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)}


def histogram_batch(batch: dict[str, np.ndarray], size: int, vocabulary: np.ndarray) -> pa.Table:
    """Ray Data pass 2: decode, HOG, histogram over the vocabulary; rows of the features schema."""
    from ktray.data import decode_batch

    dec = decode_batch(batch, size, "center", stage="hog")
    hist = bow_histograms([hog_descriptors(p) for p in dec["pixels"]], vocabulary)  # (B, V)
    words = len(vocabulary)
    feature = pa.FixedSizeListArray.from_arrays(pa.array(hist.reshape(-1), pa.float32()), words)
    return pa.Table.from_arrays(
        [pa.array(dec["image_id"].tolist(), pa.string()), feature], schema=schema.features_schema(words)
    )


def stage_config(cfg: Config) -> dict[str, Any]:
    """What the HOG features depend on (the run directory hashes exactly this)."""
    e = cfg.evaluate
    return {
        "words": e.hog_words,
        "image_size": e.hog_image_size,
        "vocab_images": e.hog_vocab_images,
        "orientations": ORIENTATIONS,
        "cell": CELL,
        "block": BLOCK,
        "split": cfg.data.train_split,
        "limit": cfg.data.limit,
        "seed": cfg.seed,
    }


def output_dir(cfg: Config) -> StageDir:
    """Where :func:`run` writes for this config and data."""
    from ktray import rundir
    from ktray.data import data_identity

    return rundir.stage_dir(cfg.root, "hog", stage_config(cfg), [data_identity(cfg.data)])


def run(cfg: Config) -> StageDir:
    """Compute HOG bag-of-words features of the training images; returns the ``hog`` stage folder.

    The folder holds ``features/*.parquet`` (features schema) and ``vocabulary.npy``, so
    ``ktray.kmeans.run(cfg, features=<this>)`` clusters it like an embed output.
    """

    from ktray import rundir
    from ktray.data import data_identity, read_split

    conf = stage_config(cfg)
    inputs = [data_identity(cfg.data)]
    sd = output_dir(cfg)
    if sd.done():
        return sd
    started = time.time()
    sd.make()
    from ktray.pipeline import init_ray

    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one

    ds = read_split(cfg.data, cfg.data.train_split)
    n = ds.count()
    per_image = 64
    # Enough sampled descriptors for a stable vocabulary (>= ~40 per word, faiss's own floor),
    # drawn from a random subset of images so the class-sorted shard order does not bias it.
    frac = min(1.0, cfg.evaluate.hog_vocab_images / max(n, 1))
    sampled = ds.random_sample(frac, seed=cfg.seed) if frac < 1.0 else ds
    t0 = time.time()
    desc = sampled.map_batches(
        sample_batch,
        fn_kwargs={"size": cfg.evaluate.hog_image_size, "per_image": per_image, "seed": cfg.seed},
        batch_format="numpy",
        batch_size=cfg.data.decode_batch_size,
    )
    descriptors = np.concatenate([b["descriptor"] for b in desc.iter_batches(batch_format="numpy", batch_size=None)])
    print(f"hog: {len(descriptors)} descriptors from ~{int(frac * n)} images in {time.time() - t0:.1f}s")
    vocab = train_vocabulary(descriptors, cfg.evaluate.hog_words, seed=cfg.seed)
    buf = io.BytesIO()
    np.save(buf, vocab)
    rundir.write_bytes_atomic(sd.path("vocabulary.npy"), buf.getvalue())

    t1 = time.time()
    ds.map_batches(
        histogram_batch,
        fn_kwargs={"size": cfg.evaluate.hog_image_size, "vocabulary": vocab},
        batch_format="numpy",
        batch_size=cfg.data.decode_batch_size,
    ).write_parquet(sd.path("features"))
    seconds = time.time() - t1
    print(f"hog: {n} histograms in {seconds:.1f}s ({n / max(seconds, 1e-9):.1f} img/s)")
    rundir.write_manifest(
        sd,
        config=conf,
        inputs=inputs,
        files=["features", "vocabulary.npy"],
        metrics={
            "summary": {"images": float(n), "descriptors": float(len(descriptors)), "images_per_s": n / seconds},
            "history": [],
        },
        started=started,
    )
    return sd
