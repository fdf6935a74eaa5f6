"""Packing: an image collection (folder, zip, tar) into Parquet shards of encoded images.

Packing keeps the *encoded* bytes (decoding happens in the stream, at the size each stage
asks for), so a shard set is written once and read by every stage and every sweep trial.

    SRC (folder, .zip, .tar[.gz])           OUT/
      train/<class>/<file>.JPEG    pack      train-00000.parquet ...   images schema
      val/<class>/<file>.JPEG      ───►      val-00000.parquet ...     (ktray.schema.IMAGES)
                                             pack_report.json          counts, skipped files

Shards are planned up front from the sorted file list (one split per shard, cut at a target
size), so shard ``i`` always holds the same files: a rerun after an interrupted pack writes
only the shards that are missing, and never a file twice. Each shard is written under a
temporary name and renamed, so a half shard is never visible.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import uuid
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ktray import schema
from ktray.data.decode import DecodeError, open_rgb
from ktray.data.shards import class_names, shard_files
from ktray.rundir import config_hash, filesystem, join, write_bytes_atomic

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


SPLIT_NAMES = ("train", "val", "test")


REPORT = "pack_report.json"


PLAN = ".pack_plan.json"


@dataclass(frozen=True)
class Entry:
    """One file of the source: its path inside the source and its size in bytes."""

    relpath: str
    size: int


def _safe_relpath(name: str) -> str | None:
    """The normalised member path, or None when it could escape the target (``..``, absolute)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name):
        return None
    return str(p)


class Source:
    """A folder, a .zip or a .tar of images, listed in sorted order and read by relpath."""

    def __init__(self, src: str | Path):
        self.src = Path(src)
        if not self.src.exists():
            raise FileNotFoundError(f"no such source: {self.src}")
        self.kind = (
            "dir" if self.src.is_dir() else "zip" if zipfile.is_zipfile(self.src) else
            "tar" if tarfile.is_tarfile(self.src) else None
        )
        if self.kind is None:
            raise ValueError(f"{self.src}: not a folder, a .zip or a .tar")
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._tar_members: dict[str, tarfile.TarInfo] = {}

    def list(self) -> tuple[list[Entry], list[dict[str, str]]]:
        """All files (sorted) and the entries refused for an unsafe path."""
        entries, refused = [], []

        def add(name: str, size: int) -> None:
            rel = _safe_relpath(name)
            if rel is None:
                refused.append({"path": name, "reason": "unsafe path (escapes the source root)"})
            else:
                entries.append(Entry(rel, size))

        if self.kind == "dir":
            for p in self.src.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    add(p.relative_to(self.src).as_posix(), p.stat().st_size)
        elif self.kind == "zip":
            for info in self._open_zip().infolist():
                if not info.is_dir():
                    add(info.filename, info.file_size)
        else:
            for m in self._open_tar().getmembers():
                if m.isfile():
                    self._tar_members[m.name] = m
                    add(m.name, m.size)
                elif m.issym() or m.islnk():
                    refused.append({"path": m.name, "reason": "link entry"})
        return sorted(entries, key=lambda e: e.relpath), refused

    def read(self, relpath: str) -> bytes:
        if self.kind == "dir":
            return (self.src / relpath).read_bytes()
        if self.kind == "zip":
            return self._open_zip().read(relpath)
        tar = self._open_tar()
        if not self._tar_members:
            self._tar_members = {m.name: m for m in tar.getmembers()}
        member = self._tar_members.get(relpath) or self._tar_members[f"./{relpath}"]
        f = tar.extractfile(member)
        return f.read() if f else b""

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.src)
        return self._zip

    def _open_tar(self) -> tarfile.TarFile:
        if self._tar is None:
            self._tar = tarfile.open(self.src)  # noqa: SIM115 - kept open while the source is read
        return self._tar


def _strip_common_root(paths: list[str]) -> str:
    """The single top folder every path shares (``imagenette2-224/``), or ''."""
    tops = {p.split("/", 1)[0] for p in paths}
    if len(tops) == 1 and all("/" in p for p in paths):
        top = tops.pop()
        if top not in SPLIT_NAMES:
            return top + "/"
    return ""


def layout(relpath: str) -> tuple[str, str | None]:
    """``(split, class_name)`` from a path below the source root.

    ``train/<class>/x.jpg`` -> (train, class); ``<class>/x.jpg`` -> (train, class);
    ``x.jpg`` -> (train, None): a flat folder is unlabeled.
    """
    parts = relpath.split("/")
    if len(parts) >= 3 and parts[0] in SPLIT_NAMES:
        return parts[0], parts[1]
    if len(parts) >= 2 and parts[0] in SPLIT_NAMES:
        return parts[0], None
    if len(parts) >= 2:
        return "train", parts[-2]
    return "train", None


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    relpaths: tuple[str, ...]

    @property
    def filename(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"


def plan_shards(entries: list[Entry], root: str, target_bytes: int) -> list[ShardPlan]:
    """Cut the sorted entries of each split into shards of about ``target_bytes``."""
    by_split: dict[str, list[Entry]] = {}
    for e in entries:
        by_split.setdefault(layout(e.relpath[len(root):])[0], []).append(e)
    plans = []
    for split in sorted(by_split):
        current: list[str] = []
        size = 0
        for e in by_split[split]:
            if current and size + e.size > target_bytes:
                plans.append(ShardPlan(split, sum(p.split == split for p in plans), tuple(current)))
                current, size = [], 0
            current.append(e.relpath)
            size += e.size
        if current:
            plans.append(ShardPlan(split, sum(p.split == split for p in plans), tuple(current)))
    return plans


def _build_shard(src: str, root: str, classes: list[str], plan: ShardPlan, out: str) -> dict[str, Any]:
    """Read, check and write one shard (runs in a worker process)."""
    source = Source(src)
    class_index = {c: i for i, c in enumerate(classes)}
    rows: dict[str, list[Any]] = {"image_id": [], "image": [], "label": [], "split": []}
    skipped = []
    for rel in plan.relpaths:
        image_id = rel[len(root):]
        split, cls = layout(image_id)
        if PurePosixPath(image_id).name.startswith("."):
            skipped.append({"path": image_id, "reason": "hidden file"})
            continue
        data = source.read(rel)
        try:
            # A small draft decode reads every compressed byte, so truncation is caught,
            # at a fraction of the cost of a full-size decode.
            open_rgb(data, draft_size=32)
        except DecodeError as exc:
            skipped.append({"path": image_id, "reason": str(exc)})
            continue
        rows["image_id"].append(image_id)
        rows["image"].append(data)
        rows["label"].append(class_index[cls] if cls is not None else None)
        rows["split"].append(split)
    table = pa.table(rows, schema=schema.with_metadata(schema.IMAGES, classes=classes, skipped=skipped))
    fs, path = filesystem(join(out, plan.filename))
    tmp = f"{path.rsplit('/', 1)[0]}/.{plan.filename}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, filesystem=fs, compression="none")  # JPEG bytes do not compress
    fs.move(tmp, path)
    return {"file": plan.filename, "rows": table.num_rows, "skipped": skipped}


def pack(
    src: str | Path,
    out: str,
    *,
    shard_mb: float = 256.0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pack an image collection into Parquet shards under ``out``; return the report.

    Safe to rerun: shards already in ``out`` are kept, missing ones written.
    """
    from tqdm import tqdm

    source = Source(src)
    entries, refused = source.list()
    if not entries:
        raise ValueError(f"{src}: no files found")
    root = _strip_common_root([e.relpath for e in entries])
    classes = sorted({c for e in entries if (c := layout(e.relpath[len(root):])[1]) is not None})
    plans = plan_shards(entries, root, int(shard_mb * 2**20))
    fs, out_path = filesystem(out)
    fs.create_dir(out_path, recursive=True)
    _remove_stale_tmp(fs, out_path)
    _claim_plan(out, plans)
    todo = [p for p in plans if fs.get_file_info(f"{out_path}/{p.filename}").type != pafs.FileType.File]
    n_todo = sum(len(p.relpaths) for p in todo)
    log.info("%d files in %d shards; %d shards to write", len(entries), len(plans), len(todo))
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=n_todo, unit="img", desc=f"pack {Path(src).name}", disable=not progress)
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_build_shard, str(src), root, classes, p, out) for p in todo]
        for plan, fut in zip(todo, futures):
            fut.result()
            bar.update(len(plan.relpaths))
    bar.close()
    report = _write_report(out, classes, refused, source=str(src))
    return report


def _claim_plan(out: str, plans: list[ShardPlan]) -> None:
    """Record the shard plan in ``out``; refuse to resume a pack planned differently.

    Resuming is only sound when shard ``i`` means the same files in both runs: a different
    source or shard size would silently mix two plans (missing and duplicated images).
    """
    plan_key = config_hash([(p.filename, p.relpaths) for p in plans])
    uri = join(out, PLAN)
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            if json.loads(f.read())["plan"] != plan_key:
                raise ValueError(
                    f"{out} holds shards packed from another source or with another --shard-mb; "
                    "pack into an empty folder (or rerun with the same source and shard size)"
                )
        return
    if shard_files(out):
        raise ValueError(f"{out} holds shards that this pack did not plan; pack into an empty folder")
    write_bytes_atomic(uri, json.dumps({"plan": plan_key, "shards": len(plans)}).encode())


def _remove_stale_tmp(fs: pafs.FileSystem, out_path: str) -> None:
    """Delete temporary shards left by a killed pack (never visible as shards anyway)."""
    for i in fs.get_file_info(pafs.FileSelector(out_path)):
        if i.base_name.startswith(".") and ".parquet.tmp-" in i.base_name:
            fs.delete_file(i.path)


def _write_report(out: str, classes: list[str], refused: list[dict[str, str]], source: str) -> dict[str, Any]:
    counts: dict[str, Counter[str]] = {}
    skipped = list(refused)
    total_bytes = 0
    fs, _ = filesystem(out)
    for f in shard_files(out):
        pf = pq.ParquetFile(filesystem(f)[1], filesystem=fs)
        meta = schema.read_metadata(pf.schema_arrow)
        skipped.extend(meta.get("skipped", []))
        total_bytes += fs.get_file_info(filesystem(f)[1]).size
        t = pf.read(columns=["label", "split"])
        for split, label in zip(t["split"].to_pylist(), t["label"].to_pylist()):
            counts.setdefault(split, Counter())[classes[label] if label is not None else "(unlabeled)"] += 1
    report = {
        "source": source,
        "classes": classes,
        "splits": {
            s: {"images": sum(c.values()), "per_class": dict(sorted(c.items()))} for s, c in sorted(counts.items())
        },
        "bytes": total_bytes,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
    }
    write_bytes_atomic(join(out, REPORT), json.dumps(report, indent=2).encode())
    return report


def info(path: str) -> dict[str, Any]:
    """The pack report of a shard directory (rebuilt from the shards when missing)."""
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no shards (expected files like train-00000.parquet)")
    fs, base = filesystem(join(path, REPORT))
    if fs.get_file_info(base).type == pafs.FileType.File:
        with fs.open_input_stream(base) as f:
            report = json.loads(f.read())
        if report.get("bytes") == sum(fs.get_file_info(filesystem(s)[1]).size for s in files):
            return report
    return _write_report(path, class_names(path), [], source=path)
