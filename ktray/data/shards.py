"""Reading packed shards: the shard files of a split, their identity for the run directory, and Ray Data reads.

A shard directory holds ``<split>-NNNNN.parquet`` files of the images contract
(``ktray.schema.IMAGES``). :func:`data_identity` names the data a stage trained on (the shards,
the limit rule, the long-tailed subset), so stage folders change when the data does;
:func:`read_split` streams exactly the rows a run uses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ktray import schema
from ktray.data.subsets import LIMIT_ORDER, limited_indices, limited_rows, long_tail_mask
from ktray.rundir import config_hash, filesystem

if TYPE_CHECKING:
    import ray.data

    from ktray.config import DataConfig


# Five digits or more: index 100000 and up is written as is (``train-123456.parquet``).
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5,})\.parquet$")

PLAN = ".pack_plan.json"  # written by the packer before its first shard: the shards a complete set holds
REPORT = "pack_report.json"  # written by the packer after its last shard: counts, skipped files, fingerprint


class DataError(ValueError):
    """A shard directory that cannot be used as it is (incomplete, mixed), with what to do about it."""


def _shard_order(name: str) -> tuple[str, int]:
    m = _SHARD_RE.match(name)
    assert m is not None
    return m["split"], int(m["index"])  # for 5-digit names, the same order as the names sorted


def shard_files(path: str, split: str | None = None) -> list[str]:
    """Sorted shard paths (URIs when ``path`` is one) of ``split`` or of every split, by split then index."""
    fs, base = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted(
        (i.base_name for i in infos
         if (m := _SHARD_RE.match(i.base_name)) and (split is None or m["split"] == split)),
        key=_shard_order,
    )
    prefix = path.rstrip("/") if "://" in path else base
    return [f"{prefix}/{n}" for n in names]


def split_names(path: str) -> list[str]:
    """The splits the shards of ``path`` hold, sorted."""
    return sorted({m["split"] for f in shard_files(path) if (m := _SHARD_RE.match(Path(f).name))})


def check_complete(path: str) -> None:
    """Raise DataError when ``path`` holds fewer (or other) shards than its pack planned.

    A pack records its plan before writing; an interrupted pack leaves only whole shards, but
    not all of them, and a partial set must never be read as if it were the data set. A set
    without a plan (packed elsewhere) is taken as it is.
    """
    fs, base = filesystem(path)
    plan_path = f"{base}/{PLAN}"
    if fs.get_file_info(plan_path).type != pafs.FileType.File:
        return
    with fs.open_input_stream(plan_path) as f:
        try:
            plan = json.loads(f.read())
        except ValueError:
            raise DataError(f"{path}: {PLAN} is damaged; pack the set again into an empty folder") from None
    present = {Path(f).name for f in shard_files(path)}
    planned = set(plan.get("files") or [])
    missing = sorted(planned - present) if planned else []
    expected = len(planned) if planned else int(plan.get("shards", len(present)))
    if missing or len(present) != expected:
        example = f" (missing: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})" if missing else ""
        raise DataError(
            f"{path}: {len(present)} of {expected} planned shards{example}: the pack did not finish; "
            "run the same `ktray data pack SRC OUT` again to write the missing shards"
        )


def sample_path() -> str:
    """The bundled sample's shards (real Imagenette photos; see ktray/sample/README.md)."""
    return str(Path(__file__).resolve().parents[1] / "sample")


def data_path(cfg: DataConfig) -> str:
    return cfg.path or sample_path()


def data_key(path: str) -> str:
    """Identity of a shard directory for the run directory's hashes: names and sizes.

    An incomplete pack has no identity: it is refused here, before any stage hashes it."""
    fs, _ = filesystem(path)
    check_complete(path)
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no shards (expected files like train-00000.parquet)")
    return "data-" + config_hash([(Path(f).name, fs.get_file_info(filesystem(f)[1]).size) for f in files])


def rows_fingerprint(table: pa.Table) -> str:
    """What a set of images is, whatever its shards: the sha256 of its (image_id, label, split) rows in
    image_id order (nulls as -1). Shard names and sizes alone miss an image moved to a class folder of
    the same name length; this does not."""
    t = table.select(["image_id", "label", "split"]).sort_by(
        [("image_id", "ascending"), ("split", "ascending"), ("label", "ascending")]
    )
    rows = [t["image_id"].to_pylist(), t["label"].fill_null(-1).to_pylist(), t["split"].to_pylist()]
    blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def data_fingerprint(path: str) -> str:
    """:func:`rows_fingerprint` of the shards in ``path``: the one its pack recorded in pack_report.json
    for these very shards (the same :func:`data_key`), else computed from their id, label and split
    columns (a pack made elsewhere or before fingerprints were recorded)."""
    key = data_key(path)
    fs, base = filesystem(path)
    report_path = f"{base}/{REPORT}"
    if fs.get_file_info(report_path).type == pafs.FileType.File:
        with fs.open_input_stream(report_path) as f:
            try:
                report = json.loads(f.read())
            except ValueError:
                report = {}
        if isinstance(report, dict) and report.get("fingerprint_key") == key and report.get("fingerprint"):
            return str(report["fingerprint"])
    return _computed_fingerprint(path, key)


@functools.lru_cache(maxsize=16)
def _computed_fingerprint(path: str, key: str) -> str:  # key: computed again only when the shards change
    return rows_fingerprint(load_table(path, None, ["image_id", "label", "split"]))


def class_names(path: str) -> list[str]:
    """The class names every shard carries; DataError when shards disagree (two packs mixed in one folder)."""
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no shards")
    check_complete(path)
    fs, _ = filesystem(path)
    seen: dict[tuple[str, ...], str] = {}
    for f in files:
        meta = schema.read_metadata(pq.read_schema(filesystem(f)[1], filesystem=fs))
        seen.setdefault(tuple(meta.get("classes", [])), Path(f).name)
    if len(seen) > 1:
        (a, fa), (b, fb) = list(seen.items())[:2]
        raise DataError(
            f"{path}: shards from different packs: {fa} has {len(a)} classes, {fb} has {len(b)} "
            f"({', '.join(sorted(set(a) ^ set(b))[:5])} differ); pack each set into its own empty folder"
        )
    return list(next(iter(seen)))


def load_table(path: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read shards on the driver (small tables: ids and labels, not images at scale)."""
    files = shard_files(path, split)
    if not files:
        raise FileNotFoundError(f"{path}: no shards for split {split!r}")
    check_complete(path)
    fs, _ = filesystem(path)
    tables = [pq.read_table(filesystem(f)[1], filesystem=fs, columns=columns) for f in files]
    for t in tables:
        if columns is None:
            schema.check_images(t.schema)
    return pa.concat_tables(tables)


def split_blocks(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """``ds`` in blocks of at most ``rows`` rows (streaming: no shuffle, no barrier).

    A read task yields one block per Parquet file, and a ``map_batches`` task takes whole
    blocks: a shard of 1,000 images would be decoded by one task on one CPU however many
    there are. Blocks of about a decode batch let every CPU decode (benchmarks/puzzles.py).
    """
    return ds.repartition(target_num_rows_per_block=rows) if rows > 0 else ds


def image_ids(path: str, split: str | None = None, limit: int = 0) -> pa.Array:
    """The ids of exactly the rows ``read_images(path, split, limit)`` streams (:func:`limited_rows`)."""
    columns = ["image_id", "label"] if limit else ["image_id"]
    return limited_rows(load_table(path, split, columns), limit)["image_id"].combine_chunks()


def _keep_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["image_id"], value_set=ids))


def read_images(path: str, split: str | None = None, limit: int = 0, block_rows: int = 0) -> ray.data.Dataset:
    """The shards of ``split`` as a Ray dataset of (undecoded) image rows.

    ``limit`` keeps the rows :func:`image_ids` names (the classes in turn), the same on every
    run: ``Dataset.limit`` would keep whichever rows arrive first.
    ``block_rows`` > 0 cuts the rows into blocks of that many (:func:`split_blocks`), so the
    decode tasks downstream run in parallel; pass the decode batch size.
    """
    import ray.data

    files = shard_files(path, split)
    if not files:
        raise FileNotFoundError(f"{path}: no shards for split {split!r}")
    check_complete(path)
    fs, _ = filesystem(path)
    schema.check_images(pq.read_schema(filesystem(files[0])[1], filesystem=fs))
    keep = None
    if limit:
        table = load_table(path, split, ["image_id", "label"])  # the shards in `files` order
        rows = limited_indices(table, limit)
        keep = table["image_id"].take(pa.array(rows)).combine_chunks()  # = image_ids(path, split, limit)
        # Only the shards that hold a kept row are read at all (row counts from the footers).
        ends = np.cumsum([pq.ParquetFile(filesystem(f)[1], filesystem=fs).metadata.num_rows for f in files])
        used = set(np.searchsorted(ends, rows, side="right").tolist())
        files = [f for i, f in enumerate(files) if i in used]
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(["image_id", "image", "label", "split"])
    if keep is not None:
        ds = ds.map_batches(_keep_ids, batch_format="pyarrow", batch_size=None, fn_kwargs={"ids": keep})
    return split_blocks(ds, block_rows)


def long_tail_on(cfg: DataConfig) -> bool:
    return cfg.long_tail > 1


def long_tail_ids(cfg: DataConfig) -> pa.Array | None:
    """The image ids of the long-tailed train split (after ``limit``), or None when it is off."""
    if not long_tail_on(cfg):
        return None
    t = load_table(data_path(cfg), cfg.train_split, ["image_id", "label"])
    t = limited_rows(t, cfg.limit)  # the rows read_images(limit=...) streams
    labels = t["label"].fill_null(-1).to_numpy(zero_copy_only=False)
    mask = long_tail_mask(labels, cfg.long_tail, cfg.long_tail_seed)
    return t["image_id"].filter(pa.array(mask)).combine_chunks()


def train_ids(cfg: DataConfig) -> pa.Array:
    """The ids of exactly the rows :func:`read_split` streams for the train split."""
    keep = long_tail_ids(cfg)
    return keep if keep is not None else image_ids(data_path(cfg), cfg.train_split, cfg.limit)


def limited_data_key(path: str, limit: int) -> str:
    """:func:`data_key`, plus the rule a limited run picks its rows by (full-data keys are unchanged)."""
    key = data_key(path)
    return f"{key}-{LIMIT_ORDER}" if limit else key


def data_identity(cfg: DataConfig) -> str:
    """The data key of the stages that train on ``cfg``'s train split: the shards, the rule a limited
    run picks its rows by, and the long-tailed subset when there is one (so balanced and long-tailed
    runs never share a stage folder)."""
    key = limited_data_key(data_path(cfg), cfg.limit)
    return f"{key}-lt{cfg.long_tail:g}-s{cfg.long_tail_seed}" if long_tail_on(cfg) else key


def _keep_rows(batch: pa.Table, keep: pa.Array, split: str) -> pa.Table:
    import pyarrow.compute as pc

    other = pc.not_equal(batch["split"], split)
    return batch.filter(pc.or_(other, pc.is_in(batch["image_id"], value_set=keep)))


def read_split(cfg: DataConfig, split: str | None, blocks: bool = True) -> ray.data.Dataset:
    """:func:`read_images` of the pipeline's data, with the train split cut to its long-tailed subset
    when ``data.long_tail`` asks for one (other splits are never cut); ``blocks``: in blocks of a
    decode batch, so every CPU decodes."""
    ds = read_images(data_path(cfg), split, cfg.limit, block_rows=cfg.decode_batch_size if blocks else 0)
    keep = long_tail_ids(cfg)
    if keep is None or split not in (None, cfg.train_split):
        return ds
    return ds.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"keep": keep, "split": cfg.train_split})
