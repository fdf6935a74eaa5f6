"""Image shards: flat folders, the bundled sample read with Ray, Imagenette (broken inputs: reliability/)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from workloads import jpeg_bytes

from ktray.data.decode import decode_batch
from ktray.data.pack import info, pack
from ktray.data.shards import class_names, image_ids, load_table, read_images
from ktray.data.subsets import limited_rows


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg_bytes((i * 40, 0, 0)))
    rep = pack(src, str(tmp_path / "out"), progress=False)
    assert rep["classes"] == [] and rep["splits"]["train"]["images"] == 3
    assert load_table(str(tmp_path / "out"))["label"].null_count == 3


def test_sample_is_bundled_and_readable_with_ray(ray_session: None, sample_shards: str) -> None:
    rep = info(sample_shards)
    assert rep["splits"]["train"]["images"] == 1000 and rep["splits"]["val"]["images"] == 300
    assert len(class_names(sample_shards)) == 10
    ds = read_images(sample_shards, "val", limit=50).map_batches(
        decode_batch, fn_kwargs={"size": 32}, batch_format="numpy", batch_size=16
    )
    rows = ds.take_all()
    assert len(rows) == 50 and rows[0]["pixels"].shape == (32, 32, 3)
    # The sample's shards are sorted by class; a limited read still holds every class, 5 each.
    assert Counter(r["label"] for r in rows) == dict.fromkeys(range(10), 5)
    assert sorted(r["image_id"] for r in rows) == sorted(image_ids(sample_shards, "val", 50).to_pylist())


def test_limit_takes_the_classes_in_turn() -> None:
    import pyarrow as pa

    table = pa.table({"image_id": list("abcdefgh"), "label": pa.array([0, 0, 0, 0, 1, 1, None, 2])})
    # The first of each class (nulls are a class), then the second of each, kept in table order.
    assert limited_rows(table, 4)["image_id"].to_pylist() == ["a", "e", "g", "h"]
    assert limited_rows(table, 6)["image_id"].to_pylist() == ["a", "b", "e", "f", "g", "h"]
    assert limited_rows(table, 0).equals(table) and limited_rows(table, 99).equals(table)
    assert limited_rows(table.drop_columns(["label"]), 3)["image_id"].to_pylist() == ["a", "b", "c"]


def test_block_rows_splits_a_shard_for_parallel_decode(ray_session: None, sample_shards: str) -> None:
    """One shard is one read block; block_rows cuts it so that decode tasks run side by side."""
    import ray

    assert len(read_images(sample_shards, "val").to_arrow_refs()) == 1
    blocks = [ray.get(r) for r in read_images(sample_shards, "val", block_rows=64).to_arrow_refs()]
    assert len(blocks) >= 300 // 64 and max(b.num_rows for b in blocks) <= 64
    ids = [i for b in blocks for i in b["image_id"].to_pylist()]
    assert sorted(ids) == sorted(load_table(sample_shards, "val", columns=["image_id"])["image_id"].to_pylist())


@pytest.mark.slow
def test_pack_imagenette(imagenette_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "imagenette"
    rep = pack(imagenette_zip, str(out), shard_mb=64, progress=False)
    assert rep["splits"]["train"]["images"] == 9469 and rep["splits"]["val"]["images"] == 3925
    assert len(rep["classes"]) == 10
    before = sorted(p.name for p in out.glob("*.parquet"))
    rep2 = pack(imagenette_zip, str(out), shard_mb=64, progress=False)
    assert rep2["splits"] == rep["splits"] and sorted(p.name for p in out.glob("*.parquet")) == before
    out_cli = subprocess.run([sys.executable, "-m", "ktray", "data", "info", str(out)],
                             capture_output=True, text=True, check=True).stdout
    assert "train: 9,469 images" in out_cli and "val: 3,925 images" in out_cli and "classes: 10" in out_cli
