"""A finished stage whose folder was damaged after the fact: never reused, never a bare traceback.

Faults and what must happen:
- a file the manifest lists was deleted: the rerun stops before any work, naming the stage to ``--force``;
- a torn ``manifest.json``: the same; ``--force`` recomputes the stage and it is whole again;
- the data relabelled under the same shard names and sizes (an image moved to a class folder of the same
  name length, packed again): the data key is the same, but the stage is refused, naming it to ``--force``,
  never reused with stale results; a manifest from before fingerprints is still reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from workloads import jpeg_bytes

from ktray.config import load_config
from ktray.data.pack import pack
from ktray.data.shards import REPORT, data_fingerprint, data_key, load_table, rows_fingerprint
from ktray.lifecycle import Output, StageDamaged, StageSpec, ensure
from ktray.stages import real_labels


def write_two(cfg: object, sd: object) -> Output:
    for name in ("a.npy", "b.json"):
        Path(sd.path(name)).write_text(name)  # type: ignore[attr-defined]
    return Output(["a.npy", "b.json"], {"x": 1.0})


def test_damaged_stage_is_refused_then_forced(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"root={tmp_path / 'runs'}"])
    spec = StageSpec("cluster", cfg, {"k": 3}, [], write_two, needs_ray=False)
    sd = ensure(spec)
    assert ensure(spec).uri == sd.uri  # whole: reused
    Path(sd.path("b.json")).unlink()
    with pytest.raises(StageDamaged, match=r"1 of its files are gone \(b\.json\).*--force cluster"):
        ensure(spec)
    ensure(spec, force=True)
    assert Path(sd.path("b.json")).exists() and sd.damage() is None
    manifest = Path(sd.path("manifest.json"))
    manifest.write_text(manifest.read_text()[:40])  # torn
    with pytest.raises(StageDamaged, match=r"manifest\.json cannot be read.*--force cluster"):
        ensure(spec)
    ensure(spec, force=True)
    assert sd.damage() is None


def test_relabelled_data_under_the_same_key_is_never_reused(tmp_path: Path) -> None:
    jpeg = jpeg_bytes((120, 30, 30), size=(16, 16))
    src, out = tmp_path / "src", tmp_path / "data"
    for rel in ("train/cat/x1.jpg", "train/cat/x3.jpg", "train/dog/x2.jpg", "val/cat/v1.jpg", "val/dog/v2.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(jpeg)
    pack(src, str(out), progress=False, workers=1)
    cfg = load_config("tiny", [f"root={tmp_path / 'runs'}", f"data.path={out}"])
    sd = real_labels.run(cfg)  # a cheap stage without Ray: the train split's real labels
    key, before = data_key(str(out)), data_fingerprint(str(out))
    assert real_labels.run(cfg) == sd  # same data: reused

    (src / "train/cat/x1.jpg").rename(src / "train/dog/x1.jpg")  # moved to a class of the same name length
    shutil.rmtree(out)
    pack(src, str(out), progress=False, workers=1)
    assert data_key(str(out)) == key, "the shard names and sizes are the same: the folder name cannot tell"
    assert data_fingerprint(str(out)) != before
    with pytest.raises(StageDamaged) as err:
        real_labels.run(cfg)
    assert str(err.value) == (
        f"[reallabels] {sd.uri} is marked done but it was computed from other rows than {out} holds now (image ids "
        "or labels changed under the same shard names and sizes): recompute it with `ktray run CONFIG --force "
        "reallabels` (or delete the folder)"
    )
    assert real_labels.run(cfg, force=True) == sd
    assert real_labels.run(cfg) == sd  # computed from the data as it is now: reused
    labels = pq.read_table(sd.path("labels.parquet"))
    assert dict(zip(labels["image_id"].to_pylist(), labels["cluster"].to_pylist())) == {
        "train/cat/x3.jpg": 0, "train/dog/x1.jpg": 1, "train/dog/x2.jpg": 1}

    # a pack from before fingerprints: computed from its shards, the same as the pack's own
    report = json.loads((out / REPORT).read_text())
    assert report["fingerprint"] == rows_fingerprint(load_table(str(out), columns=["image_id", "label", "split"]))
    (out / REPORT).write_text(json.dumps({k: v for k, v in report.items() if not k.startswith("fingerprint")}))
    assert data_fingerprint(str(out)) == report["fingerprint"]
    # a manifest from before fingerprints: reused as it is
    manifest = Path(sd.path("manifest.json"))
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "data"}
    manifest.write_text(json.dumps(old))
    (src / "train/dog/x1.jpg").rename(src / "train/cat/x1.jpg")
    shutil.rmtree(out)
    pack(src, str(out), progress=False, workers=1)
    assert real_labels.run(cfg) == sd
