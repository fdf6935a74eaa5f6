"""Arrow schemas of the tables passed between stages, and the checks at each boundary.

DESIGN.md's contracts:

- images:   image_id string, image binary (encoded bytes), label int32 (nullable), split string
- features: image_id string, feature fixed_size_list<float32>[d]
- labels:   image_id string, cluster int32, distance float32; metadata k, seed, features

A stage that reads a table calls the matching ``check_*`` first, so a wrong table is
refused at the boundary with a message that names the problem, not deep inside a worker.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("split", pa.string(), nullable=False),
    ]
)

LABELS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("distance", pa.float32(), nullable=False),
    ]
)


class SchemaError(ValueError):
    """A table or weights file crossing a stage boundary does not match its contract (or claims
    more than it holds)."""


def features_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("feature", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


def with_metadata(schema: pa.Schema, **meta: Any) -> pa.Schema:
    """Attach JSON-encoded metadata (``k=2000``, ``classes=[...]``) to a schema."""
    merged = dict(schema.metadata or {})
    merged.update({k.encode(): json.dumps(v).encode() for k, v in meta.items()})
    return schema.with_metadata(merged)


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """Inverse of :func:`with_metadata` (keys Arrow itself writes, like pandas, are skipped)."""
    out: dict[str, Any] = {}
    for key, value in (schema.metadata or {}).items():
        try:
            out[key.decode()] = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return out


def _check_columns(table_name: str, schema: pa.Schema, expected: pa.Schema) -> None:
    for f in expected:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            raise SchemaError(f"{table_name} table: missing column {f.name!r} (expected {expected})")
        if not schema.field(idx).type.equals(f.type):
            raise SchemaError(
                f"{table_name} table: column {f.name!r} has type {schema.field(idx).type}, expected {f.type}"
            )


def check_images(schema: pa.Schema) -> None:
    _check_columns("images", schema, IMAGES)


def feature_dim(schema: pa.Schema) -> int:
    idx = schema.get_field_index("feature")
    if idx < 0 or schema.get_field_index("image_id") < 0:
        raise SchemaError(f"features table: expected columns image_id, feature; got {schema.names}")
    tp = schema.field(idx).type
    if not (pa.types.is_fixed_size_list(tp) and tp.value_type == pa.float32()):
        raise SchemaError(f"features table: column 'feature' has type {tp}, expected fixed_size_list<float32>[d]")
    return tp.list_size


def check_unique_ids(table_name: str, ids: pa.Array | pa.ChunkedArray) -> None:
    if ids.null_count:
        raise SchemaError(f"{table_name} table: {ids.null_count} null image_id values")
    counts = pc.value_counts(ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise SchemaError(
            f"{table_name} table: {len(dup)} duplicate image_id values, e.g. {dup[:3].to_pylist()}"
        )


def check_labels(
    table: pa.Table, image_ids: pa.Array | pa.ChunkedArray | None = None, *, max_k: int | None = None
) -> int:
    """Validate a labels table; return k. With ``image_ids``, both sides must hold the same ids.

    ``k`` sizes what its readers allocate (a k-way classifier, per-cluster counts), so it is held
    to what the table holds: an integer (not a bool, a string or a float), at most ``max_k`` (the
    largest k a config accepts) and at most the table's rows (every cluster had a row to start from).
    """
    _check_columns("labels", table.schema, LABELS)
    meta = read_metadata(table.schema)
    if "k" not in meta:
        raise SchemaError("labels table: schema metadata lacks 'k' (the number of clusters)")
    k = meta["k"]
    if isinstance(k, bool) or not isinstance(k, int):
        raise SchemaError(f"labels table: metadata k={k!r} is not an integer")
    if k < 1:
        raise SchemaError(f"labels table: metadata k={k} (the number of clusters) must be at least 1")
    if max_k is not None and k > max_k:
        raise SchemaError(f"labels table: metadata k={k} is above {max_k:,}, the most clusters a config accepts")
    if k > table.num_rows:
        raise SchemaError(f"labels table: metadata k={k} is above its {table.num_rows:,} rows (a k-way "
                          "labelling of fewer images than clusters)")
    check_unique_ids("labels", table["image_id"])
    if table["cluster"].null_count:
        raise SchemaError(f"labels table: {table['cluster'].null_count} rows have no cluster id (null)")
    clusters = table["cluster"].to_numpy()
    if len(clusters) and (clusters.min() < 0 or clusters.max() >= k):
        bad = int(np.sum((clusters < 0) | (clusters >= k)))
        raise SchemaError(f"labels table: {bad} cluster ids outside 0..{k - 1}")
    if image_ids is not None:
        have = set(table["image_id"].to_pylist())
        want = set(image_ids.to_pylist())
        missing, extra = want - have, have - want
        if missing:
            raise SchemaError(f"labels table: {len(missing)} image_ids have no cluster, e.g. {sorted(missing)[:3]}")
        if extra:
            raise SchemaError(f"labels table: {len(extra)} image_ids are not in the images, e.g. {sorted(extra)[:3]}")
    return k


def features_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``fixed_size_list<float32>[d]`` column as a float32 (N, d) matrix."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)
