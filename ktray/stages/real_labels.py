"""Real labels as a labels table: the targets of the compare table's Supervised row (the ceiling).

The stage writes the train split's real classes in the cluster stage's contract (``cluster`` =
the class), so the transfer stage trains a supervised student exactly as it trains a CC one.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ktray import schema
from ktray.artifacts import LABELS
from ktray.data.shards import class_names, data_identity, data_path, load_table, long_tail_ids
from ktray.data.subsets import limited_rows
from ktray.lifecycle import Output, StageSpec, ensure
from ktray.rundir import StageDir, write_bytes_atomic

if TYPE_CHECKING:
    from ktray.config import Config


def spec(cfg: Config) -> StageSpec:
    params = {"split": cfg.data.train_split, "limit": cfg.data.limit}
    return StageSpec("reallabels", cfg, params, [data_identity(cfg.data)], compute, needs_ray=False,
                     data=(data_path(cfg.data),))


def output_dir(cfg: Config) -> StageDir:
    return spec(cfg).dir


def run(cfg: Config, **how: Any) -> StageDir:
    """The real labels' stage folder, written first unless done (``how``: ``force``, ``tracker``)."""
    return ensure(spec(cfg), **how)


def compute(cfg: Config, sd: StageDir) -> Output:
    """The train split's (limited, long-tailed) rows with their real class as ``cluster``."""
    path = data_path(cfg.data)
    t = load_table(path, cfg.data.train_split, ["image_id", "label"])
    t = limited_rows(t, cfg.data.limit)  # the rows read_images(limit=...) streams
    keep = long_tail_ids(cfg.data)
    if keep is not None:  # the long-tailed subset the other rows train on
        t = t.filter(pc.is_in(t["image_id"], value_set=keep))
    if t["label"].null_count:
        raise ValueError(f"the Supervised row needs real labels: {t['label'].null_count} images of split "
                         f"{cfg.data.train_split!r} in {path} have none")
    k = len(class_names(path)) or int(pc.max(t["label"]).as_py()) + 1
    table = pa.table(
        {
            "image_id": t["image_id"],
            "cluster": t["label"].cast(pa.int32()),
            "distance": pa.array([0.0] * t.num_rows, pa.float32()),
        },
        schema=schema.with_metadata(schema.LABELS, k=k, seed=0, features="real labels"),
    )
    schema.check_labels(table)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(sd.path(LABELS), buf.getvalue())
    return Output([LABELS], {"k": float(k), "images": float(t.num_rows)})
