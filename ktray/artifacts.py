"""What one stage writes for another: the file names inside stage folders and their readers.

The Arrow schemas are ``ktray.schema``'s; this module knows where in a stage folder they lie,
so a stage reads its upstream's output without importing the stage that wrote it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from ktray import schema
from ktray.config import MAX_K
from ktray.rundir import StageDir, filesystem

TEACHER = "teacher.pt"  # pretext: the teacher's trunk (ktray.models.trunks weights format)
EMA_TEACHER = "ema_teacher.pt"  # pretext (ISD): the EMA teacher's trunk, beside the student's
PERMUTATIONS = "permutations.npy"  # pretext (Jigsaw++): the (N, 9) permutation set
FEATURES_DIR = "features"  # embed, hog: features/*.parquet (schema.features_schema)
LABELS = "labels.parquet"  # cluster, real labels: schema.LABELS
STUDENT = "student.pt"  # transfer: the student's trunk
RESULTS = "results"  # evaluate: results.json, results.csv, results.md
PREDICTIONS = "predictions.npz"  # evaluate: image_id and, per tap and for knn, which val images were right


def parquet_files(uri: str) -> list[tuple[str, int]]:
    """The Parquet files directly under ``uri``, sorted, with their row counts (from the footers)."""
    fs, base = filesystem(uri)
    infos = fs.get_file_info(pa.fs.FileSelector(base, allow_not_found=True))
    paths = sorted(i.path for i in infos if i.type == pa.fs.FileType.File and i.base_name.endswith(".parquet"))
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [(prefix + p, pq.ParquetFile(p, filesystem=fs).metadata.num_rows) for p in paths]


def feature_files(features: StageDir) -> list[tuple[str, int]]:
    """The features Parquet files of an embed (or hog) stage, sorted, with their row counts."""
    files = parquet_files(features.path(FEATURES_DIR))
    if not files:
        raise FileNotFoundError(f"{features.path(FEATURES_DIR)}: no features Parquet files")
    return files


def read_labels(labels: StageDir, image_ids: pa.Array | None = None) -> tuple[pa.Table, int]:
    """The cluster stage's ``labels.parquet`` (checked against the labels contract) and k, which is at
    most the table's rows and the largest k a config accepts.

    With ``image_ids``, the table must label exactly those images (see ``schema.check_labels``).
    """
    uri = labels.path(LABELS)
    fs, path = filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    try:
        k = schema.check_labels(table, image_ids, max_k=MAX_K)
    except schema.SchemaError as exc:
        raise schema.SchemaError(f"{uri}: {exc}") from None
    return table.select(["image_id", "cluster"]), k
