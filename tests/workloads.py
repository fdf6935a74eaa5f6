"""Small workloads shared by the tests: the pipeline scaled to seconds per stage, learnable labels."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import schema
from ktray.data import load_table
from ktray.rundir import StageDir, stage_dir, write_bytes_atomic, write_manifest

# The tiny preset, smaller still: these runs check mechanics, not accuracy.
FAST_PIPELINE = [
    "data.limit=200",
    "pretext.epochs=2",
    "pretext.val_puzzles=64",
    "cluster.k=10",
    "cluster.niter=5",
    "transfer.epochs=2",
    "evaluate.taps=[conv3, conv5]",
    "evaluate.fewshot_episodes=50",
]


def real_label_clusters(run_root: str, sample_shards: str, classes: int = 4, per_class: int = 100) -> StageDir:
    """A cluster stage folder whose pseudo-labels are the real labels: learnable by design.

    It labels the first ``classes * per_class`` train images, which the sample's class-sorted
    shards make ``per_class`` images of each of the first ``classes`` classes: run the
    transfer stage on it with ``data.limit=classes * per_class``.
    """
    sub = load_table(sample_shards, "train", ["image_id", "label"]).slice(0, classes * per_class)
    assert np.bincount(sub["label"].to_numpy()).tolist() == [per_class] * classes
    table = pa.table(
        {
            "image_id": sub["image_id"],
            "cluster": sub["label"].cast(pa.int32()),
            "distance": pa.array(np.zeros(sub.num_rows, np.float32)),
        },
        schema=schema.with_metadata(schema.LABELS, k=classes, seed=0, features="real-labels"),
    )
    sd = stage_dir(run_root, "cluster", {"real": classes, "n": per_class})
    sd.make()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(sd.path("labels.parquet"), buf.getvalue())
    write_manifest(sd, config={}, files=["labels.parquet"])
    return sd
