"""Fault: a labels table that breaks the contract reaches the transfer stage.

Must: the stage refuses it at its boundary, before any folder or worker exists, with a
message naming the problem; nothing is trained on a table that would silently drop or
mislabel images.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from workloads import real_label_clusters

from ktray import schema
from ktray.config import load_config
from ktray.data.shards import image_ids
from ktray.rundir import StageDir, stage_dir, write_bytes_atomic, write_manifest
from ktray.stages import transfer

N = 400  # real_label_clusters labels the 400 train images data.limit=400 streams (10 classes x 40)


def _with_k(table: pa.Table, k: object) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"k": json.dumps(k).encode()})


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _cluster_at(table: pa.Table, row: int, value: int | None) -> pa.Table:
    clusters = table["cluster"].to_pylist()
    clusters[row] = value
    return _set_column(table, "cluster", pa.array(clusters, pa.int32()))


# name -> (how the good table is broken, what the refusal must say)
BREAKS: dict[str, tuple[Callable[[pa.Table], pa.Table], str]] = {
    "missing image_ids": (lambda t: t.slice(0, N - 3), "3 image_ids have no cluster"),
    "an image from elsewhere": (
        lambda t: pa.concat_tables([t, _set_column(t.slice(0, 1), "image_id", pa.array(["x/y.jpg"]))],
                                   promote_options="permissive"),
        "1 image_ids are not in the images",
    ),
    "duplicate image_ids": (lambda t: pa.concat_tables([t, t.slice(10, 2)]), "2 duplicate image_id"),
    "null image_id": (
        lambda t: _set_column(t, "image_id", pa.array([None, *t["image_id"].to_pylist()[1:]], pa.string())),
        "1 null image_id",
    ),
    "null cluster": (lambda t: _cluster_at(t, 5, None), "1 rows have no cluster id"),
    "cluster above k": (lambda t: _cluster_at(t, 5, 10), "1 cluster ids outside 0..9"),
    "negative cluster": (lambda t: _cluster_at(t, 7, -1), "1 cluster ids outside 0..9"),
    "no cluster column": (lambda t: t.drop_columns(["cluster"]), "missing column 'cluster'"),
    "clusters as floats": (
        lambda t: _set_column(t, "cluster", pc.cast(t["cluster"], pa.float64())), "column 'cluster' has type double"
    ),
    "image_id as integers": (
        lambda t: _set_column(t, "image_id", pa.array(np.arange(t.num_rows))), "column 'image_id' has type int64"
    ),
    "no k in the metadata": (lambda t: t.replace_schema_metadata({}), "lacks 'k'"),
    "k not an integer": (lambda t: _with_k(t, "many"), "k='many' is not an integer"),
    "k of zero": (lambda t: _with_k(t, 0), "must be at least 1"),
}


def _labels_stage(root: str, table: pa.Table, name: str) -> StageDir:
    sd = stage_dir(root, "cluster", {"broken": name})
    sd.make()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(sd.path("labels.parquet"), buf.getvalue())
    write_manifest(sd, config={}, files=["labels.parquet"])
    return sd


@pytest.mark.parametrize("name", list(BREAKS))
def test_transfer_refuses_a_broken_labels_table(name: str, sample_shards: str, run_root: str) -> None:
    good = real_label_clusters(run_root, sample_shards)
    table = pq.read_table(good.path("labels.parquet"))
    assert schema.check_labels(table) == 10
    cfg = load_config("tiny", [f"root={run_root}", f"data.limit={N}"])
    transfer.output_dir(cfg, good)  # the good table passes the same boundary (checked end to end in test_transfer)

    breaks, message = BREAKS[name]
    bad = _labels_stage(run_root, breaks(table), name)
    with pytest.raises(schema.SchemaError, match=re.escape(message)):
        transfer.run(cfg, bad)
    assert not os.path.exists(transfer.output_dir(cfg, bad).uri), "a refused table must leave no stage folder"


def test_a_good_table_passes_the_boundary(sample_shards: str, run_root: str) -> None:
    good = real_label_clusters(run_root, sample_shards)
    table = pq.read_table(good.path("labels.parquet"))
    assert schema.check_labels(table, image_ids(sample_shards, "train", N)) == 10
