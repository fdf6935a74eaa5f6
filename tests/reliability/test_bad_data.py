"""Bad data: broken, odd and hostile image files, and a pack killed midway.

Faults and what must happen:
- a truncated JPEG, a zero-byte file, a text file named .jpg, a .txt: skipped, counted, listed with a reason;
- greyscale, CMYK, palette, 16-bit and alpha images, a 1x1 image: decoded to RGB;
- a 10000x10000 image: refused before its pixels are decoded (decompression-bomb guard);
- a zip entry with ``..``: refused, nothing written outside the target;
- ``ktray data pack`` SIGKILLed midway: only whole shards are visible; a rerun writes each image exactly once;
  its pool workers die with it (Linux), none left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from workloads import jpeg_bytes as _jpeg
from workloads import png_bytes as _png

from ktray import schema
from ktray.data.decode import DecodeError, decode_batch, decode_image, open_rgb
from ktray.data.pack import REPORT, pack
from ktray.data.pack import info as pack_info
from ktray.data.shards import DataError, load_table


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    """An ImageFolder with good images of every mode and every kind of broken file."""
    src = tmp_path / "src"
    files: dict[str, bytes] = {
        "train/cat/rgb.jpg": _jpeg((200, 10, 10)),
        "train/cat/grey.jpg": _jpeg((90, 90, 90), mode="L"),
        "train/cat/cmyk.jpg": _jpeg((10, 200, 10), mode="CMYK"),
        "train/dog/alpha.png": _png(Image.new("RGBA", (20, 20), (0, 0, 255, 0))),  # fully transparent
        "train/dog/palette.png": _png(Image.new("RGB", (16, 16), (0, 0, 255)).convert("P")),
        "train/dog/sixteen.png": _png(Image.fromarray(np.full((8, 8), 65535, np.uint16))),
        "train/dog/tiny.png": _png(Image.new("RGB", (1, 1), (5, 6, 7))),
        "val/cat/v1.jpg": _jpeg((10, 10, 200)),
        "val/dog/v2.jpg": _jpeg((10, 200, 200)),
        # broken: each must be skipped, counted and listed with a reason
        "train/cat/truncated.jpg": _jpeg((1, 2, 3), size=(64, 64))[:300],
        "train/cat/empty.jpg": b"",
        "train/dog/notes.jpg": b"this is a text file, not an image\n",
        "train/dog/README.txt": b"hello",
    }
    for rel, blob in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(blob)
    return src


def ids_of(shards: str) -> list[str]:
    """Every image_id in a shard directory, in shard order."""
    return load_table(shards, columns=["image_id"])["image_id"].to_pylist()


def test_pack_messy_folder_counts_report_and_pixels(messy_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    report = pack(messy_folder, str(out), progress=False)
    assert report["classes"] == ["cat", "dog"]
    assert report["splits"]["train"]["images"] == 7
    assert report["splits"]["val"]["images"] == 2
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"train/cat/truncated.jpg", "train/cat/empty.jpg", "train/dog/notes.jpg",
                            "train/dog/README.txt"}
    assert skipped["train/cat/empty.jpg"] == "empty file"
    assert all(reason for reason in skipped.values())
    assert (out / REPORT).exists()

    table = load_table(str(out))
    schema.check_images(table.schema)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    # packing keeps the original bytes: conversion happens when decoded
    assert rows["train/cat/cmyk.jpg"]["image"] == (messy_folder / "train/cat/cmyk.jpg").read_bytes()
    assert rows["train/dog/alpha.png"]["label"] == 1 and rows["val/cat/v1.jpg"]["split"] == "val"

    def pix(rel: str) -> np.ndarray:
        arr = decode_image(rows[rel]["image"], 8)
        assert arr is not None and arr.shape == (8, 8, 3) and arr.dtype == np.uint8
        return arr.reshape(-1, 3).mean(0)

    assert np.allclose(pix("train/cat/rgb.jpg"), (200, 10, 10), atol=6)
    grey = pix("train/cat/grey.jpg")
    assert np.allclose(grey, grey[0], atol=1) and abs(grey[0] - 90) < 6
    assert np.allclose(pix("train/cat/cmyk.jpg"), (10, 200, 10), atol=12)
    assert np.allclose(pix("train/dog/alpha.png"), (255, 255, 255))  # transparent -> white
    assert np.allclose(pix("train/dog/palette.png"), (0, 0, 255))
    assert np.allclose(pix("train/dog/sixteen.png"), (255, 255, 255))  # 16-bit scaled, not clipped garbage
    assert np.allclose(pix("train/dog/tiny.png"), (5, 6, 7))

    info = pack_info(str(out))
    assert info["splits"] == report["splits"] and len(info["skipped"]) == 4


def test_repack_adds_nothing(messy_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    pack(messy_folder, str(out), progress=False)
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")}
    pack(messy_folder, str(out), progress=False)
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")}
    assert before == after
    assert sorted(ids_of(str(out))) == sorted(set(ids_of(str(out))))


def test_decode_guards() -> None:
    assert decode_image(b"", 8) is None
    assert decode_image(b"GIF89a garbage", 8) is None
    bomb = _png(Image.new("L", (10_000, 10_000)))
    with pytest.raises(DecodeError, match="pixel limit"):
        open_rgb(bomb)
    assert decode_image(bomb, 8) is None
    big = decode_image(_jpeg((50, 100, 150), size=(300, 200)), 64, mode="random", rng=np.random.default_rng(0))
    assert big is not None and big.shape == (64, 64, 3)


def test_decode_batch_drops_bad_rows() -> None:
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "image": np.array([_jpeg((1, 2, 3)), b"nope", _jpeg((3, 2, 1))], dtype=object),
        "label": np.array([0, 1, None], dtype=object),
    }
    out = decode_batch(batch, 16)
    assert list(out["image_id"]) == ["a", "c"]
    assert out["pixels"].shape == (2, 16, 16, 3)
    assert list(out["label"]) == [0, -1]


def test_archives_and_unsafe_entries(messy_folder: Path, tmp_path: Path) -> None:
    zpath = tmp_path / "set.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in sorted(messy_folder.rglob("*")):
            if f.is_file():
                z.write(f, f"myset/{f.relative_to(messy_folder).as_posix()}")
        z.writestr("myset/../../evil.jpg", _jpeg((0, 0, 0)))
    tpath = tmp_path / "set.tar.gz"
    with tarfile.open(tpath, "w:gz") as t:
        t.add(messy_folder, arcname="myset")
    zrep = pack(zpath, str(tmp_path / "z"), progress=False)
    trep = pack(tpath, str(tmp_path / "t"), progress=False)
    assert zrep["splits"] == trep["splits"]
    assert any(s["reason"].startswith("unsafe path") for s in zrep["skipped"])
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()
    assert set(ids_of(str(tmp_path / "z"))) == set(ids_of(str(tmp_path / "t")))


def test_killed_pack_resumes_without_duplicates(sample_shards: str, tmp_path: Path) -> None:
    """A pack killed with SIGKILL midway leaves only whole shards; a rerun finishes the job."""
    src = tmp_path / "src"
    table = load_table(sample_shards)
    for image_id, blob in zip(table["image_id"].to_pylist(), table["image"].to_pylist()):
        (src / image_id).parent.mkdir(parents=True, exist_ok=True)
        (src / image_id).write_bytes(blob)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ktray", "data", "pack", str(src), str(out), "--shard-mb", "0.004", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.parquet"))) < 20:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("*.parquet")))
    expected = set(table["image_id"].to_pylist())
    partial = {i for f in out.glob("*.parquet") for i in pq.read_table(f)["image_id"].to_pylist()}  # whole shards
    assert written >= 20 and len(partial) < len(expected), "kill landed too late"
    with pytest.raises(DataError, match="planned shards"):
        ids_of(str(out))  # an interrupted pack is never read as the data set
    with pytest.raises(ValueError, match="another --shard-mb"):
        pack(src, str(out), progress=False)  # a different plan must not be mixed in
    pack(src, str(out), shard_mb=0.004, progress=False, workers=1)
    ids = list(ids_of(str(out)))
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def _children(pid: int) -> dict[int, str]:
    """The live (not zombie) children of ``pid``, with their state, read from /proc."""
    kids: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while listed
        if int(fields[1]) == pid and fields[0] not in "ZX":
            kids[int(stat.parent.name)] = fields[0]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in "ZX"  # a zombie has exited; only its reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux-only")
def test_killed_pack_leaves_no_pool_worker(tmp_path: Path) -> None:
    """``kill -9`` of ``ktray data pack`` (the parent alone, not its group): every pool worker dies
    with it within seconds; a rerun finishes with every image exactly once."""
    src = tmp_path / "src"
    expected = set()
    for c in range(4):
        (src / "train" / f"c{c}").mkdir(parents=True)
        for i in range(50):
            (src / "train" / f"c{c}" / f"{i:03d}.jpg").write_bytes(_jpeg((60 * c, 2 * i, 90), size=(24, 24)))
            expected.add(f"train/c{c}/{i:03d}.jpg")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ktray", "data", "pack", str(src), str(out), "--shard-mb", "0.002", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: dict[int, str] = {}
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.005)
        assert len(workers) >= 2, f"the pool never started (exit {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers are not told
        proc.wait()
        assert not (out / REPORT).exists(), "kill landed too late"
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.01)
        assert not [w for w in workers if _alive(w)], "a pool worker outlived the killed pack"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # orphans keep the group: leave none behind on failure
    pack(src, str(out), shard_mb=0.002, progress=False, workers=1)
    ids = ids_of(str(out))
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_pool_worker_whose_parent_is_gone_exits() -> None:
    """A worker whose parent died before it could ask for the parent-death signal kills itself."""
    code = ("import sys; from ktray.data.pack import _die_with_parent; "
            "_die_with_parent(int(sys.argv[1])); print('alive')")
    ok = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "alive", ok.stderr
    orphan = subprocess.run([sys.executable, "-c", code, str(os.getpid() + 1)], capture_output=True, text=True)
    assert orphan.returncode == -signal.SIGKILL and "alive" not in orphan.stdout
