"""Packs that cannot be mixed, lost or misread: hostile and careless archives and folders.

Faults and what must happen:
- ``data sample`` into a folder that holds another pack: refused; shards of two packs in one folder: refused;
- two packs into one OUT at once: one set comes out whole, the other pack is refused, never a mix;
- duplicate entry names (also ``a.jpg`` next to ``./a.jpg``): none packed, each listed;
- ``__MACOSX/``, ``validation/``/``valid/``, nested class folders, a single class folder, loose images
  beside class folders: read right, or refused naming the ambiguity;
- symlinked images and class folders: listed with a reason; ``--follow-links`` follows those inside SRC;
- an interrupted pack: refused wherever the data is opened, until the pack is finished;
- shards numbered 100000 and up: read;
- backslash, ``./`` and ``//`` names, encrypted, Deflate64 and bad-CRC entries, a truncated ``.tar.gz``,
  devices and FIFOs in a tar: skipped and listed, never a crash;
- a zip bomb entry: refused before it is read; a ``.tar.gz`` in shuffled order: read once, in linear time;
- an empty SRC, an OUT that is a file, a SRC that is not an archive, ``--shard-mb nan``: one line, exit 2;
- skip reasons without memory addresses; names with terminal escapes printed escaped.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from workloads import jpeg_bytes

from ktray import schema
from ktray.data.pack import LayoutError, pack
from ktray.data.pack import info as pack_info
from ktray.data.shards import PLAN, DataError, class_names, data_key, load_table, shard_files

JPEG = jpeg_bytes((120, 30, 30), size=(16, 16))


def ktray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ktray", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={**os.environ, "TQDM_DISABLE": "1"})


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    return root


def two_classes(root: Path, n: int = 2, classes: tuple[str, str] = ("cat", "dog")) -> Path:
    return write_tree(root, {f"train/{c}/{c}{i}.jpg": jpeg_bytes((i, 9, 9), size=(16, 16))
                             for c in classes for i in range(n)})


def rows(out: Path) -> dict[str, tuple[str | None, str]]:
    t = load_table(str(out), columns=["image_id", "label", "split"])
    names = class_names(str(out))
    return {i: (names[lb] if lb is not None else None, s)
            for i, lb, s in zip(t["image_id"].to_pylist(), t["label"].to_pylist(), t["split"].to_pylist())}


# ----------------------------------------------------------------------------- data loss (5, 6, 7)


def test_sample_never_overwrites_a_pack_and_mixed_shards_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    pack(two_classes(tmp_path / "src"), str(out), progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    res = ktray("data", "sample", str(out))
    assert res.returncode == 2 and "not an empty folder" in res.stderr and "Traceback" not in res.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    # a shard of another pack dropped beside: the classes disagree, and every reader says so
    other = tmp_path / "other"
    pack(two_classes(tmp_path / "src2", classes=("ant", "bee")), str(other), progress=False)
    (other / "train-00000.parquet").rename(out / "train-00001.parquet")
    (out / PLAN).unlink()
    with pytest.raises(DataError, match="different packs"):
        class_names(str(out))
    with pytest.raises(DataError, match="different packs"):
        pack_info(str(out))


def test_two_concurrent_packs_never_mix(tmp_path: Path) -> None:
    a = two_classes(tmp_path / "a", n=60, classes=("cat", "dog"))
    b = two_classes(tmp_path / "b", n=60, classes=("ant", "bee"))
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "ktray", "data", "pack", str(src), str(out), "--shard-mb",
                               "0.002", "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"}) for src in (a, b)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "another source" in refused and "Traceback" not in refused
    got = rows(out)
    winner = {"cat", "dog"} if {c for c, _ in got.values()} == {"cat", "dog"} else {"ant", "bee"}
    assert {c for c, _ in got.values()} == winner and len(got) == 240 // 2
    assert all(i.split("/")[1] == c for i, (c, _) in got.items())  # every image under its own class


def test_duplicate_entries_are_refused_and_listed(tmp_path: Path) -> None:
    z = tmp_path / "dup.zip"
    with zipfile.ZipFile(z, "w") as f:
        for cls in ("cat", "dog"):
            f.writestr(f"train/{cls}/ok.jpg", JPEG)
        f.writestr("train/cat/a.jpg", JPEG)
        f.writestr("train/cat/./a.jpg", jpeg_bytes((0, 200, 0)))
        with pytest.warns(UserWarning, match="Duplicate name"):
            f.writestr("train/dog/b.jpg", JPEG)
            f.writestr("train/dog/b.jpg", jpeg_bytes((0, 0, 200)))
    report = pack(z, str(tmp_path / "out"), progress=False)
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped["train/cat/a.jpg"].startswith("duplicate entry") and "train/dog/b.jpg" in skipped
    ids = load_table(str(tmp_path / "out"), columns=["image_id"])["image_id"].to_pylist()
    assert sorted(ids) == ["train/cat/ok.jpg", "train/dog/ok.jpg"]


# ----------------------------------------------------------------------------- silent wrong results (8, 10-12)


def test_layouts_are_read_right_or_refused(tmp_path: Path) -> None:
    z = tmp_path / "mac.zip"
    with zipfile.ZipFile(z, "w") as f:
        for split in ("train", "validation"):
            for cls in ("cat", "dog"):
                f.writestr(f"set/{split}/{cls}/{cls}.jpg", JPEG)
                f.writestr(f"__MACOSX/set/{split}/{cls}/._{cls}.jpg", b"\x00\x05\x16\x07")
        f.writestr("set/.DS_Store", b"x")
    pack(z, str(tmp_path / "o1"), progress=False)
    assert rows(tmp_path / "o1") == {"train/cat/cat.jpg": ("cat", "train"), "train/dog/dog.jpg": ("dog", "train"),
                   "validation/cat/cat.jpg": ("cat", "val"), "validation/dog/dog.jpg": ("dog", "val")}

    nested = write_tree(tmp_path / "nested", {"cat/2019/a.jpg": JPEG, "cat/2020/b.jpg": JPEG, "dog/2019/c.jpg": JPEG})
    pack(nested, str(tmp_path / "o2"), progress=False)
    assert {c for c, _ in rows(tmp_path / "o2").values()} == {"cat", "dog"}

    valid = write_tree(tmp_path / "valid", {"train/a/1.jpg": JPEG, "train/b/2.jpg": JPEG, "Valid/a/3.jpg": JPEG})
    assert pack(valid, str(tmp_path / "o3"), progress=False)["splits"]["val"]["images"] == 1

    for name, files, match in [
        ("single", {"cat/1.jpg": JPEG, "cat/2.jpg": JPEG}, "one class only"),
        ("loose", {"cat/1.jpg": JPEG, "dog/2.jpg": JPEG, "3.jpg": JPEG}, "loose images"),
        ("mixed", {"train/cat/1.jpg": JPEG, "train/dog/1.jpg": JPEG, "bird/2.jpg": JPEG}, "beside other folders"),
    ]:
        with pytest.raises(LayoutError, match=match):
            pack(write_tree(tmp_path / name, files), str(tmp_path / f"o-{name}"), progress=False)
    single = pack(tmp_path / "single", str(tmp_path / "o-single-u"), progress=False, unlabeled=True)
    assert single["classes"] == [] and single["splits"]["train"]["images"] == 2


def test_symlinks_are_listed_and_followed_only_inside(tmp_path: Path) -> None:
    src = two_classes(tmp_path / "src")
    outside = write_tree(tmp_path / "elsewhere", {"x.jpg": JPEG})
    (src / "train" / "cat" / "link.jpg").symlink_to(src / "train" / "dog" / "dog0.jpg")
    (src / "train" / "bird").symlink_to(src / "train" / "dog", target_is_directory=True)
    (src / "train" / "cat" / "out.jpg").symlink_to(outside / "x.jpg")
    report = pack(src, str(tmp_path / "o1"), progress=False)
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"train/cat/link.jpg", "train/bird", "train/cat/out.jpg"}
    assert all("symbolic link" in r for r in skipped.values())
    followed = pack(src, str(tmp_path / "o2"), progress=False, follow_links=True)
    assert followed["classes"] == ["bird", "cat", "dog"] and followed["splits"]["train"]["images"] == 7
    assert [s["path"] for s in followed["skipped"]] == ["train/cat/out.jpg"]


def test_interrupted_pack_is_refused_everywhere(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pack(two_classes(tmp_path / "src", n=5), str(out), shard_mb=0.001, progress=False)
    data_key(str(out))  # complete: has a key
    victim = sorted(out.glob("train-*.parquet"))[3]
    victim.unlink()
    for reader in (data_key, pack_info, class_names, load_table):
        with pytest.raises(DataError, match="9 of 10 planned shards"):
            reader(str(out))
    res = ktray("data", "info", str(out))
    assert res.returncode == 2 and "did not finish" in res.stderr
    pack(tmp_path / "src", str(out), shard_mb=0.001, progress=False)  # the rerun writes just the missing one
    assert victim.exists() and len(load_table(str(out))) == 10


def test_shards_numbered_past_99999_are_read(tmp_path: Path) -> None:
    table = pa.table({"image_id": ["a", "b"], "image": [JPEG, JPEG], "label": pa.array([0, 1], pa.int32()),
                      "split": ["train", "train"]}, schema=schema.with_metadata(schema.IMAGES, classes=["x", "y"]))
    for index, t in ((99999, table.slice(0, 1)), (100000, table.slice(1, 1))):
        pq.write_table(t, tmp_path / f"train-{index:05d}.parquet")
    assert [Path(f).name for f in shard_files(str(tmp_path))] == ["train-99999.parquet", "train-100000.parquet"]
    assert load_table(str(tmp_path))["image_id"].to_pylist() == ["a", "b"]


# ----------------------------------------------------------------------------- crashes, hangs, memory (15-17, 22, 23)


def _zip_entry(f: zipfile.ZipFile, name: str, data: bytes, **fields: int) -> None:
    info = zipfile.ZipInfo(name)
    f.writestr(info, data)
    for k, v in fields.items():
        setattr(f.filelist[-1], k, v)


def test_odd_archive_entries_are_skipped_not_fatal(tmp_path: Path) -> None:
    z = tmp_path / "odd.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("train/cat/ok.jpg", JPEG)
        f.writestr("train/dog/ok.jpg", JPEG)
        f.writestr("train\\cat\\back.jpg", JPEG)
        f.writestr("./train/cat/dot.jpg", JPEG)
        f.writestr("train//dog//slashes.jpg", JPEG)
        _zip_entry(f, "train/cat/encrypted.jpg", JPEG, flag_bits=0x1)
        _zip_entry(f, "train/cat/deflate64.jpg", JPEG, compress_type=9)
        _zip_entry(f, "train/dog/badcrc.jpg", JPEG, CRC=0xDEADBEEF)
    report = pack(z, str(tmp_path / "out"), progress=False)
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped == {
        "train/cat/encrypted.jpg": "encrypted entry",
        "train/cat/deflate64.jpg": "zip compression method 9 is not supported",
        "train/dog/badcrc.jpg": "unreadable entry: BadZipFile: Bad CRC-32 for file 'train/dog/badcrc.jpg'",
    }
    assert sorted(rows(tmp_path / "out")) == ["train/cat/back.jpg", "train/cat/dot.jpg", "train/cat/ok.jpg",
                                              "train/dog/ok.jpg", "train/dog/slashes.jpg"]


def test_truncated_tar_and_devices_are_listed(tmp_path: Path) -> None:
    tpath = tmp_path / "set.tar"
    with tarfile.open(tpath, "w") as t:
        for i in range(6):
            data = os.urandom(4000) if i == 99 else jpeg_bytes((i * 40, 90 - i * 9, 5 + i), size=(40, 24 + i))
            info = tarfile.TarInfo(f"train/{'cat' if i % 2 else 'dog'}/{i}.jpg")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for kind, name in ((tarfile.FIFOTYPE, "train/cat/fifo.jpg"), (tarfile.CHRTYPE, "train/cat/tty.jpg")):
            info = tarfile.TarInfo(name)
            info.type = kind
            t.addfile(info)
    raw = tpath.read_bytes()
    whole = gzip.compress(raw)

    def stdlib_listing(blob: bytes) -> tuple[int, bool]:
        count, failed = 0, False
        try:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r|*") as t:
                for _ in t:
                    count += 1
        except (tarfile.TarError, EOFError):
            failed = True
        return count, failed

    cuts: dict[str, int] = {}  # "silent": tarfile alone sees a clean, shorter archive; "loud": it raises
    for n in range(len(whole) // 4, len(whole)):
        count, failed = stdlib_listing(whole[:n])
        if 0 < count < 8:
            cuts.setdefault("loud" if failed else "silent", n)
    assert set(cuts) == {"silent", "loud"}
    for kind, n in cuts.items():
        gz = tmp_path / f"{kind}.tar.gz"
        gz.write_bytes(whole[:n])
        report = pack(gz, str(tmp_path / f"out-{kind}"), progress=False, unlabeled=True)
        reasons = [s["reason"] for s in report["skipped"]]
        assert any(r.startswith("archive truncated or damaged") for r in reasons), (kind, reasons)
    full = pack(tpath, str(tmp_path / "full"), progress=False)
    assert {s["path"]: s["reason"] for s in full["skipped"]} == {
        "train/cat/fifo.jpg": "not a regular file (a device or FIFO entry)",
        "train/cat/tty.jpg": "not a regular file (a device or FIFO entry)",
    }
    assert len(rows(tmp_path / "full")) == 6


def test_zip_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as f:
        f.writestr("train/cat/ok.jpg", JPEG)
        f.writestr("train/dog/ok.jpg", JPEG)
        f.writestr("train/cat/bomb.jpg", b"\0" * (65 * 2**20))
    assert z.stat().st_size < 200_000
    # the peak resident memory of the packing process itself (VmHWM starts afresh at exec)
    code = ("import sys, json, re; from ktray.data.pack import pack; "
            "r = pack(sys.argv[1], sys.argv[2], progress=False, workers=1); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
            "print(json.dumps([r['skipped'], hwm]))")
    res = subprocess.run([sys.executable, "-c", code, str(z), str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120)
    skipped, peak_kb = json.loads(res.stdout.strip().splitlines()[-1])
    assert [s["path"] for s in skipped] == ["train/cat/bomb.jpg"] and "decompression-bomb" in skipped[0]["reason"]
    assert peak_kb < 250_000, peak_kb  # imports only: the 65 MB entry was never expanded


def test_shuffled_tar_gz_is_read_once(tmp_path: Path) -> None:
    names = [f"train/{'cat' if i % 2 else 'dog'}/{i:04d}.jpg" for i in range(400)]
    random.Random(0).shuffle(names)
    tpath = tmp_path / "big.tar.gz"
    with tarfile.open(tpath, "w:gz") as t:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(JPEG)
            t.addfile(info, io.BytesIO(JPEG))
    t0 = time.perf_counter()
    report = pack(tpath, str(tmp_path / "out"), shard_mb=0.01, progress=False, workers=1)
    seconds = time.perf_counter() - t0
    assert report["splits"]["train"]["images"] == 400 and len(shard_files(str(tmp_path / "out"))) >= 10
    assert seconds < 15, f"{seconds:.1f} s for 400 files: the archive was re-read per shard"


def test_bad_invocations_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "notes.zip").write_text("not an archive")
    src = two_classes(tmp_path / "src")
    cases = [
        (("data", "pack", str(tmp_path / "empty"), str(tmp_path / "o1")), "no image files"),
        (("data", "pack", str(src), str(tmp_path / "a_file")), "not a folder"),
        (("data", "pack", str(tmp_path / "notes.zip"), str(tmp_path / "o2")), "not a folder, a .zip or a .tar"),
        (("data", "pack", str(src), str(tmp_path / "o3"), "--shard-mb", "nan"), "--shard-mb"),
        (("data", "pack", str(src), str(tmp_path / "o4"), "--shard-mb", "-1"), "--shard-mb"),
        (("data", "info", str(tmp_path / "empty")), "no shards"),
    ]
    for args, message in cases:
        res = ktray(*args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_reports_are_stable_and_names_printed_escaped(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"train/cat/ok.jpg": JPEG, "train/dog/ok.jpg": JPEG,
                                        "train/cat/junk.jpg": b"not an image at all",
                                        "train/dog/\x1b[31mred.jpg": b"\xff\xd8 broken"})
    first = pack(src, str(tmp_path / "o1"), progress=False)["skipped"]
    second = pack(src, str(tmp_path / "o2"), progress=False)["skipped"]
    assert first == second and not any("0x" in s["reason"] for s in first)
    res = ktray("data", "info", str(tmp_path / "o1"))
    assert res.returncode == 0 and "\x1b" not in res.stdout and "\\x1b[31mred.jpg" in res.stdout
    # a folder of non-images is no class; OUT inside SRC is left out of the listing, so a rerun works
    write_tree(src, {"train/docs/readme.txt": b"hello"})
    inner = src / "shards"
    assert pack(src, str(inner), progress=False)["classes"] == ["cat", "dog"]
    assert pack(src, str(inner), progress=False)["classes"] == ["cat", "dog"]
