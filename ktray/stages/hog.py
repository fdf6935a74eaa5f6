"""HOG bag-of-words features: the paper's non-learned "CC+HOG" baseline (Sec. 5, Table 4).

Clustering HOG instead of a teacher's conv4 tells how much of the transfer comes from the
teacher's knowledge and how much from clustering at all. The output is a features table
under ``features/``, the embed stage's contract, so the cluster stage takes either unchanged.
The HOG maths is ``ktray.algos.hog``; Ray sits here: one Ray Data pass samples block
descriptors to learn the vocabulary (faiss k-means on the driver), a second pass turns every
image into its histogram.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ktray import schema
from ktray.algos.hog import BLOCK, CELL, ORIENTATIONS, _sample_rows, bow_histograms, hog_descriptors, train_vocabulary
from ktray.artifacts import FEATURES_DIR
from ktray.data.decode import decode_batch
from ktray.data.shards import data_identity, data_path, read_split
from ktray.lifecycle import Output, StageSpec, ensure
from ktray.rundir import StageDir, write_npy

if TYPE_CHECKING:
    from ktray.config import Config

VOCABULARY = "vocabulary.npy"
DESCRIPTORS_PER_IMAGE = 64


def sample_batch(batch: dict[str, np.ndarray], size: int, per_image: int, seed: int) -> dict[str, np.ndarray]:
    """Ray Data pass 1: decode, HOG, keep ``per_image`` random block descriptors per image."""
    dec = decode_batch(batch, size, "center", stage="hog")
    rows = []
    for image_id, pixels in zip(dec["image_id"], dec["pixels"], strict=True):
        d = hog_descriptors(pixels)
        rows.append(d[_sample_rows(str(image_id), len(d), per_image, seed)])
    dim = BLOCK * BLOCK * ORIENTATIONS
    return {"descriptor": np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)}


def histogram_batch(batch: dict[str, np.ndarray], size: int, vocabulary: np.ndarray) -> pa.Table:
    """Ray Data pass 2: decode, HOG, histogram over the vocabulary; rows of the features schema."""
    dec = decode_batch(batch, size, "center", stage="hog")
    hist = bow_histograms([hog_descriptors(p) for p in dec["pixels"]], vocabulary)  # (B, V)
    words = len(vocabulary)
    feature = pa.FixedSizeListArray.from_arrays(pa.array(hist.reshape(-1), pa.float32()), words)
    return pa.Table.from_arrays(
        [pa.array(dec["image_id"].tolist(), pa.string()), feature], schema=schema.features_schema(words)
    )


def params(cfg: Config) -> dict[str, Any]:
    """What the HOG features depend on besides the data (the folder hash)."""
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


def spec(cfg: Config) -> StageSpec:
    return StageSpec("hog", cfg, params(cfg), [data_identity(cfg.data)], compute, data=(data_path(cfg.data),))


def output_dir(cfg: Config) -> StageDir:
    return spec(cfg).dir


def run(cfg: Config, **how: Any) -> StageDir:
    """The HOG features' stage folder, computed first unless done (``how``: ``force``, ``tracker``)."""
    return ensure(spec(cfg), **how)


def compute(cfg: Config, sd: StageDir) -> Output:
    """HOG bag-of-words features of the training images: ``features/*.parquet`` and ``vocabulary.npy``."""
    ds = read_split(cfg.data, cfg.data.train_split)
    n = ds.count()
    # Enough sampled descriptors for a stable vocabulary (>= ~40 per word, faiss's own floor),
    # drawn from a random subset of images so the class-sorted shard order does not bias it.
    frac = min(1.0, cfg.evaluate.hog_vocab_images / max(n, 1))
    sampled = ds.random_sample(frac, seed=cfg.seed) if frac < 1.0 else ds
    t0 = time.time()
    desc = sampled.map_batches(
        sample_batch,
        fn_kwargs={"size": cfg.evaluate.hog_image_size, "per_image": DESCRIPTORS_PER_IMAGE, "seed": cfg.seed},
        batch_format="numpy",
        batch_size=cfg.data.decode_batch_size,
    )
    descriptors = np.concatenate([b["descriptor"] for b in desc.iter_batches(batch_format="numpy", batch_size=None)])
    print(f"hog: {len(descriptors)} descriptors from ~{int(frac * n)} images in {time.time() - t0:.1f}s")
    vocab = train_vocabulary(descriptors, cfg.evaluate.hog_words, seed=cfg.seed)
    write_npy(sd.path(VOCABULARY), vocab)

    t1 = time.time()
    ds.map_batches(
        histogram_batch,
        fn_kwargs={"size": cfg.evaluate.hog_image_size, "vocabulary": vocab},
        batch_format="numpy",
        batch_size=cfg.data.decode_batch_size,
    ).write_parquet(sd.path(FEATURES_DIR))
    seconds = time.time() - t1
    print(f"hog: {n} histograms in {seconds:.1f}s ({n / max(seconds, 1e-9):.1f} img/s)")
    summary = {"images": float(n), "descriptors": float(len(descriptors)), "images_per_s": n / seconds}
    return Output([FEATURES_DIR, VOCABULARY], summary)
