"""Packing: an image collection (folder, zip, tar) into Parquet shards of encoded images.

Packing keeps the *encoded* bytes (decoding happens in the stream, at the size each stage
asks for), so a shard set is written once and read by every stage and every sweep trial.

    SRC (folder, .zip, .tar[.gz])           OUT/
      train/<class>/<file>.JPEG    pack      train-00000.parquet ...   images schema
      val/<class>/<file>.JPEG      ───►      val-00000.parquet ...     (ktray.schema.IMAGES)
                                             pack_report.json          counts, skipped files

Shards are planned up front from the sorted file list (a tar's in archive order, which is
read once; one split per shard, cut at a target size), so shard ``i`` always holds the same
files: a rerun after an interrupted pack writes only the shards that are missing, and never
a file twice. Each shard is written under a
temporary name and renamed, so a half shard is never visible.
"""

from __future__ import annotations

import bz2
import ctypes
import fcntl
import gzip
import json
import logging
import lzma
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ktray import schema
from ktray.data.decode import DecodeError, open_rgb
from ktray.data.shards import (
    PLAN,
    REPORT,
    DataError,
    check_complete,
    class_names,
    data_key,
    rows_fingerprint,
    shard_files,
)
from ktray.rundir import config_hash, filesystem, join, write_bytes_atomic

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Folder names read as a split (any case), and the split each becomes.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
SPLIT_NAMES = tuple(sorted(set(SPLIT_ALIASES.values())))

# Operating-system metadata, never images: skipped and listed, never a class or a split.
METADATA_DIRS = ("__MACOSX",)
METADATA_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")

# An entry larger than this is refused before it is read (a zip bomb expands a few KB to GBs);
# ImageNet's largest JPEG is about 15 MB.
MAX_ENTRY_BYTES = 64 * 2**20

# Zip compression methods the standard library reads: stored, deflate, bzip2, lzma.
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


LOCK = ".pack.lock"

FOLLOW_HINT = "symbolic link, not followed (--follow-links follows links that stay inside SRC)"


class LayoutError(DataError):
    """A source whose split and class folders cannot be read one way only."""


@dataclass(frozen=True)
class Entry:
    """One file of the source: its normalised path below the source, its size, and the name it is read by."""

    relpath: str
    size: int
    name: str = ""  # the member name in the archive, or the file's path; relpath when empty

    @property
    def key(self) -> str:
        return self.name or self.relpath


def reason_of(exc: BaseException) -> str:
    """A skip reason that is the same on every run: no memory addresses, one line."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")
    return " ".join(text.split())[:300]


def _safe_relpath(name: str) -> str | None:
    """The normalised member path, or None when it could escape the target (``..``, absolute).

    Backslashes are separators; ``./`` and ``//`` collapse (``a//./b`` is ``a/b``)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name):
        return None
    rel = str(p)
    return None if rel in ("", ".") else rel


def _skip_reason(rel: str) -> str | None:
    """Why a (safe) path is not an image to pack, or None."""
    parts = rel.split("/")
    if any(p in METADATA_DIRS for p in parts[:-1]) or parts[-1] in METADATA_FILES or parts[-1].startswith("._"):
        return "operating-system metadata, not an image"
    if any(p.startswith(".") for p in parts):
        return "hidden file"
    if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        return f"not an image file name (expected one of {', '.join(IMAGE_EXTENSIONS)})"
    return None


class Source:
    """A folder, a .zip or a .tar of images: listed once, read by entry name.

    Nothing in the source aborts a pack: every entry that is not packed (unsafe, duplicate,
    encrypted, too large, a link, a device) is returned with the reason."""

    def __init__(self, src: str | Path, *, follow_links: bool = False, max_entry_bytes: int = MAX_ENTRY_BYTES,
                 exclude: str | Path | None = None):
        self.src = Path(src)
        if not self.src.exists():
            raise FileNotFoundError(f"no such source: {self.src}")
        self.kind = (
            "dir" if self.src.is_dir() else "zip" if zipfile.is_zipfile(self.src) else
            "tar" if _is_tar(self.src) else None
        )
        if self.kind is None:
            raise DataError(f"{self.src}: not a folder, a .zip or a .tar[.gz|.bz2|.xz]")
        self.follow_links = follow_links
        self.max_entry_bytes = max_entry_bytes
        self.exclude = os.path.realpath(exclude) if exclude is not None else None
        self._zip: zipfile.ZipFile | None = None

    def list(self) -> tuple[list[Entry], list[dict[str, str]]]:
        """The files to pack (sorted; a tar's in archive order) and every entry left out, with its reason."""
        raw: list[Entry] = []
        skipped: list[dict[str, str]] = []

        def add(name: str, size: int, read_name: str | None = None) -> None:
            rel = _safe_relpath(name)
            if rel is None:
                skipped.append({"path": name, "reason": "unsafe path (escapes the source root)"})
            elif (why := _skip_reason(rel)) is not None:
                skipped.append({"path": rel, "reason": why})
            elif size > self.max_entry_bytes:
                skipped.append({"path": rel, "reason": f"{size:,} bytes: over the {self.max_entry_bytes:,}-byte "
                                                      "entry limit (decompression-bomb guard)"})
            else:
                raw.append(Entry(rel, size, read_name if read_name is not None else name))

        if self.kind == "dir":
            self._list_dir(add, skipped)
        elif self.kind == "zip":
            try:
                infos = self._open_zip().infolist()
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                raise DataError(f"{self.src}: unreadable zip ({reason_of(exc)})") from None
            for info in infos:
                if info.is_dir():
                    if info.file_size:
                        skipped.append({"path": info.filename, "reason": "a folder entry that holds data"})
                    continue
                if info.flag_bits & 0x1:
                    skipped.append({"path": info.filename, "reason": "encrypted entry"})
                elif info.compress_type not in ZIP_METHODS:
                    skipped.append({"path": info.filename,
                                    "reason": f"zip compression method {info.compress_type} is not supported"})
                else:
                    add(info.filename, info.file_size)
        else:
            self._list_tar(add, skipped)
        counts = Counter(e.relpath for e in raw)
        entries = []
        for e in raw:
            if counts[e.relpath] > 1:
                skipped.append({"path": e.relpath, "reason": f"duplicate entry: {counts[e.relpath]} entries of "
                                                             "the source have this path (none packed)"})
            else:
                entries.append(e)
        if self.kind != "tar":
            entries.sort(key=lambda e: e.relpath)
        return entries, skipped

    def _list_dir(self, add: Any, skipped: list[dict[str, str]]) -> None:
        root = os.path.realpath(self.src)
        seen = {root}
        stack: list[tuple[str, str]] = [(str(self.src), "")]
        while stack:
            folder, prefix = stack.pop()
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda d: d.name)
            for d in children:
                rel = prefix + d.name
                if d.is_symlink():
                    real = os.path.realpath(d.path)
                    inside = real == root or real.startswith(root + os.sep)
                    if not self.follow_links:
                        skipped.append({"path": rel, "reason": FOLLOW_HINT})
                    elif not inside:
                        skipped.append({"path": rel, "reason": "symbolic link leading outside SRC, not followed"})
                    elif os.path.isdir(real):
                        if real in seen:
                            skipped.append({"path": rel, "reason": "symbolic link loop, not followed"})
                        else:
                            seen.add(real)
                            stack.append((real, rel + "/"))
                    elif os.path.isfile(real):
                        add(rel, os.stat(real).st_size, real)
                    else:
                        skipped.append({"path": rel, "reason": "symbolic link to nothing"})
                elif d.is_dir(follow_symlinks=False):
                    if self.exclude is not None and os.path.realpath(d.path) == self.exclude:
                        continue  # the output folder inside the source
                    seen.add(os.path.realpath(d.path))
                    stack.append((d.path, rel + "/"))
                elif d.is_file(follow_symlinks=False):
                    add(rel, d.stat(follow_symlinks=False).st_size, rel)
                else:
                    skipped.append({"path": rel, "reason": "not a regular file (a device, FIFO or socket)"})

    def _list_tar(self, add: Any, skipped: list[dict[str, str]]) -> None:
        n = 0
        try:
            with _TarStream(self.src) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for m in tar:
                    n += 1
                    if m.isfile():
                        add(m.name, m.size)
                    elif m.issym() or m.islnk():
                        skipped.append({"path": m.name, "reason": "link entry"})
                    elif not m.isdir():
                        skipped.append({"path": m.name, "reason": "not a regular file (a device or FIFO entry)"})
                raw.check_end()
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            skipped.append({"path": f"{self.src.name} (after entry {n})",
                            "reason": f"archive truncated or damaged: {reason_of(exc)}"})

    def read(self, entry: Entry) -> bytes:
        """The bytes of one listed file (not for tars: :meth:`stream`); at most ``max_entry_bytes``."""
        limit = self.max_entry_bytes
        if self.kind == "dir":
            path = Path(entry.key) if os.path.isabs(entry.key) else self.src / entry.key
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        elif self.kind == "zip":
            with self._open_zip().open(entry.key) as f:
                data = f.read(limit + 1)
        else:
            raise TypeError("tar sources are read in one pass: Source.stream")
        if len(data) > limit:
            raise DecodeError(f"more than {limit:,} bytes (decompression-bomb guard)")
        return data

    def stream(self, wanted: set[str]) -> Iterator[tuple[str, bytes | str]]:
        """One pass over a tar in archive order: ``(member name, bytes or a skip reason)`` for ``wanted``.

        A damaged or truncated archive ends the pass; the members not reached are not yielded."""
        try:
            with _TarStream(self.src) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for m in tar:
                    if m.name not in wanted or not m.isfile():
                        continue
                    try:
                        f = tar.extractfile(m)
                        yield m.name, f.read() if f is not None else b""
                    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
                        yield m.name, f"unreadable entry: {reason_of(exc)}"
                        return
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            log.warning("%s: archive ends early (%s)", self.src, reason_of(exc))

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.src)
        return self._zip


class _TarStream:
    """A tar's bytes, decompressed as they are read, remembering the last 1 KiB and the count.

    tarfile ends a stream silently where a header is missing, so a tar cut at a member
    boundary would look complete: :meth:`check_end` drains the rest and raises unless the
    archive ends as every tar writer ends it (whole 512-byte blocks, two zero blocks last)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            magic = f.read(6)
        self._open = (gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic[:3] == b"BZh"
                      else lzma.open if magic == b"\xfd7zXZ\x00" else open)
        self._path = path
        self._f = self._open(path, "rb")
        self._tail = b""
        self.count = 0
        self.cut: EOFError | None = None
        self._step = 1 << 16

    def read(self, n: int = -1) -> bytes:
        chunks, want = [], n if n >= 0 else 1 << 62
        while want > 0 and self.cut is None:
            try:
                chunk = self._f.read(min(self._step, want))
            except EOFError as exc:
                if self._step == 512:
                    self.cut = exc
                    break
                # A decompressor that hits the cut drops what that call read: go back to the
                # last good offset and read up to the cut block by block (once, at the cut).
                self._f.close()
                self._f = self._open(self._path, "rb")
                self._f.seek(self.count + sum(len(c) for c in chunks))
                self._step = 512
                continue
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        data = b"".join(chunks)
        self.count += len(data)
        self._tail = (self._tail + data)[-1024:]
        return data

    def check_end(self) -> None:
        while self.read(1 << 20):
            pass
        if self.cut is not None:
            raise self.cut
        if self.count % 512 or len(self._tail) < 1024 or self._tail.strip(b"\0"):
            raise EOFError("the archive ends without a tar end-of-archive marker (cut short)")

    def __enter__(self) -> _TarStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error):
        return False


def _strip_common_root(paths: list[str]) -> str:
    """The wrapper folders every path shares (``imagenette2-224/``), or ''.

    A single top folder is a wrapper when it holds folders only and is not a split; a single
    top folder that holds images directly is left for :func:`check_layout` to question."""
    root = ""
    rest = paths
    while rest:
        tops = {p.split("/", 1)[0] for p in rest}
        if len(tops) != 1 or not all(p.count("/") >= 2 for p in rest):
            break
        top = tops.pop()
        if top.lower() in SPLIT_ALIASES:
            break
        root += top + "/"
        rest = [p.split("/", 1)[1] for p in rest]
    return root


def layout(relpath: str) -> tuple[str, str | None]:
    """``(split, class_name)`` from a path below the source root (after its wrapper folders).

    ``train/<class>/.../x.jpg`` -> (train, class); ``validation/...``, ``valid/...`` -> val;
    ``<class>/.../x.jpg`` -> (train, class): the class is the first folder (ImageFolder's rule);
    ``x.jpg`` or ``val/x.jpg`` -> unlabeled.
    """
    parts = relpath.split("/")
    split = "train"
    if len(parts) >= 2 and parts[0].lower() in SPLIT_ALIASES:
        split, parts = SPLIT_ALIASES[parts[0].lower()], parts[1:]
    return split, parts[0] if len(parts) >= 2 else None


def check_layout(relpaths: list[str], unlabeled: bool = False) -> None:
    """Raise LayoutError when the split and class folders can be read more than one way.

    Ambiguous: split folders beside other folders (``train/`` next to ``cat/``); images directly
    in a split or the root beside class folders; a single folder of images (one class, or an
    unlabeled set in a wrapper?); one class only. ``unlabeled`` packs every image without a label.
    """
    tops = {p.split("/", 1)[0] for p in relpaths if "/" in p}
    splits = {t for t in tops if t.lower() in SPLIT_ALIASES}
    if splits and tops - splits:
        others = ", ".join(sorted(tops - splits)[:5])
        raise LayoutError(
            f"split folders ({', '.join(sorted(splits))}) beside other folders ({others}): "
            f"are these classes of train, or splits? Move them under a split ({', '.join(SPLIT_NAMES)})"
        )
    if unlabeled:
        return
    by_split: dict[str, tuple[set[str], list[str]]] = {}
    for p in relpaths:
        split, cls = layout(p)
        classes, loose = by_split.setdefault(split, (set(), []))
        if cls is None:
            loose.append(p)
        else:
            classes.add(cls)
    for split, (classes, loose) in sorted(by_split.items()):
        if classes and loose:
            raise LayoutError(
                f"split {split!r} has images in class folders ({', '.join(sorted(classes)[:3])}) and loose images "
                f"beside them ({loose[0]}): put every image in a class folder, or pass --unlabeled"
            )
    labeled = {c for classes, _ in by_split.values() for c in classes}
    if len(labeled) == 1:
        raise LayoutError(
            f"one class only ({labeled.pop()!r}): one folder of images is either one class or an unlabeled set "
            "in a wrapper folder; pass --unlabeled for an unlabeled set, or add the other class folders"
        )


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    relpaths: tuple[str, ...]
    names: tuple[str, ...] = ()  # how each file is read (Entry.key); not part of the plan's identity

    @property
    def filename(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"


def plan_shards(entries: list[Entry], root: str, target_bytes: int) -> list[ShardPlan]:
    """Cut the entries of each split, in the order given, into shards of about ``target_bytes``."""
    by_split: dict[str, list[Entry]] = {}
    for e in entries:
        by_split.setdefault(layout(e.relpath[len(root):])[0], []).append(e)
    plans = []
    for split in sorted(by_split):
        current: list[Entry] = []
        size = 0
        index = 0
        for e in by_split[split]:
            if current and size + e.size > target_bytes:
                plans.append(ShardPlan(split, index, tuple(c.relpath for c in current), tuple(c.key for c in current)))
                index += 1
                current, size = [], 0
            current.append(e)
            size += e.size
        if current:
            plans.append(ShardPlan(split, index, tuple(c.relpath for c in current), tuple(c.key for c in current)))
    return plans


def _write_shard(root: str, classes: list[str], plan: ShardPlan, out: str, blobs: dict[str, bytes | str],
                 unlabeled: bool = False) -> dict[str, Any]:
    """Check and write one shard from its files' bytes (a str is the reason a file could not be read)."""
    class_index = {c: i for i, c in enumerate(classes)}
    rows: dict[str, list[Any]] = {"image_id": [], "image": [], "label": [], "split": []}
    skipped = []
    for rel, name in zip(plan.relpaths, plan.names or plan.relpaths):
        image_id = rel[len(root):]
        split, cls = layout(image_id)
        data = blobs.get(name, "archive ends before this entry")
        if isinstance(data, str):
            skipped.append({"path": image_id, "reason": data})
            continue
        try:
            # A small draft decode reads every compressed byte, so truncation is caught,
            # at a fraction of the cost of a full-size decode.
            open_rgb(data, draft_size=32)
        except DecodeError as exc:
            skipped.append({"path": image_id, "reason": str(exc)})
            continue
        rows["image_id"].append(image_id)
        rows["image"].append(data)
        rows["label"].append(class_index[cls] if cls is not None and not unlabeled else None)
        rows["split"].append(split)
    table = pa.table(rows, schema=schema.with_metadata(schema.IMAGES, classes=classes, skipped=skipped))
    fs, path = filesystem(join(out, plan.filename))
    tmp = f"{path.rsplit('/', 1)[0]}/.{plan.filename}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, filesystem=fs, compression="none")  # JPEG bytes do not compress
    fs.move(tmp, path)
    return {"file": plan.filename, "rows": table.num_rows, "skipped": skipped}


def _build_shard(src: str, root: str, classes: list[str], plan: ShardPlan, out: str,
                 max_entry_bytes: int = MAX_ENTRY_BYTES, unlabeled: bool = False) -> dict[str, Any]:
    """Read, check and write one shard of a folder or zip (runs in a worker process)."""
    source = Source(src, max_entry_bytes=max_entry_bytes, follow_links=True)
    blobs: dict[str, bytes | str] = {}
    for rel, name in zip(plan.relpaths, plan.names or plan.relpaths):
        try:
            blobs[name] = source.read(Entry(rel, 0, name))
        except DecodeError as exc:
            blobs[name] = str(exc)
        except Exception as exc:  # an unreadable entry (bad CRC, Deflate64, vanished file) is skipped, listed
            blobs[name] = f"unreadable entry: {reason_of(exc)}"
    return _write_shard(root, classes, plan, out, blobs, unlabeled)


@contextmanager
def _pack_lock(out_path: str, local: bool) -> Iterator[None]:
    """One pack at a time per OUT (``flock``, released by the kernel when its holder dies)."""
    if not local:
        yield
        return
    with open(os.path.join(out_path, LOCK), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another pack is writing %s; waiting for it", out_path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pack(
    src: str | Path,
    out: str,
    *,
    shard_mb: float = 256.0,
    workers: int | None = None,
    progress: bool = True,
    follow_links: bool = False,
    unlabeled: bool = False,
    max_entry_bytes: int = MAX_ENTRY_BYTES,
) -> dict[str, Any]:
    """Pack an image collection into Parquet shards under ``out``; return the report.

    Safe to rerun: shards already in ``out`` are kept, missing ones written. Two packs into one
    ``out`` run one after the other; the second finds the first's plan and either finishes it
    (the same source and shard size) or is refused.
    """
    from tqdm import tqdm

    if not (isinstance(shard_mb, (int, float)) and 0 < shard_mb < 2**40):
        raise DataError(f"--shard-mb: expected a number of MB > 0, got {shard_mb!r}")
    fs, out_path = filesystem(out)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local and os.path.exists(out_path) and not os.path.isdir(out_path):
        raise DataError(f"{out}: exists and is not a folder")
    source = Source(src, follow_links=follow_links, max_entry_bytes=max_entry_bytes,
                    exclude=out_path if local else None)
    entries, refused = source.list()
    if not entries:
        raise DataError(f"{src}: no image files found" + (f" ({len(refused)} entries skipped: "
                        f"{refused[0]['path']}: {refused[0]['reason']}, ...)" if refused else ""))
    root = _strip_common_root([e.relpath for e in entries])
    check_layout([e.relpath[len(root):] for e in entries], unlabeled)
    classes = [] if unlabeled else sorted(
        {c for e in entries if (c := layout(e.relpath[len(root):])[1]) is not None}
    )
    plans = plan_shards(entries, root, max(1, int(shard_mb * 2**20)))
    fs.create_dir(out_path, recursive=True)
    with _pack_lock(out_path, local):
        _remove_stale_tmp(fs, out_path)
        _claim_plan(out, plans)
        todo = [p for p in plans if fs.get_file_info(f"{out_path}/{p.filename}").type != pafs.FileType.File]
        n_todo = sum(len(p.relpaths) for p in todo)
        log.info("%d files in %d shards; %d shards to write", len(entries), len(plans), len(todo))
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
        bar = tqdm(total=n_todo, unit="img", desc=f"pack {Path(src).name}", disable=not progress)
        with _pool(workers) if workers > 1 else _Inline() as pool:
            if source.kind == "tar":
                _pack_tar(source, root, classes, todo, out, pool, workers, bar, unlabeled)
            else:
                futures = [pool.submit(_build_shard, str(src), root, classes, p, out, max_entry_bytes, unlabeled)
                           for p in todo]
                for plan, fut in zip(todo, futures):
                    fut.result()
                    bar.update(len(plan.relpaths))
        bar.close()
        return _write_report(out, classes, refused, source=str(src))


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers die with the process that made it, even by SIGKILL.

    On Linux the workers are forked from this process (a fork server's children hold its
    liveness pipe open, so the server and they would outlive a killed pack), from the calling
    thread, which outlives the pool: the kernel's parent-death signal follows that thread.
    """
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),))


def _die_with_parent(parent: int) -> None:
    """Pool initializer: on Linux, ask the kernel to SIGKILL this worker when its parent dies, so
    a killed pack leaves no worker behind; a worker whose parent is already gone exits at once.
    A no-op where ``prctl`` does not exist (macOS)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return
    except (OSError, AttributeError) as exc:
        log.warning("prctl unavailable: %s", exc)
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


class _Inline:
    """An executor that runs each call at once in this process (one worker: no pool to orphan)."""

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _pack_tar(source: Source, root: str, classes: list[str], todo: list[ShardPlan], out: str,
              pool: ProcessPoolExecutor | _Inline, workers: int, bar: Any, unlabeled: bool) -> None:
    """A tar is read once, in archive order (a compressed tar cannot seek back): each shard goes
    to a worker as soon as its last file has been read; at most ``2 * workers`` wait in memory."""
    owner = {name: i for i, p in enumerate(todo) for name in (p.names or p.relpaths)}
    blobs: list[dict[str, bytes | str]] = [{} for _ in todo]
    pending: list[tuple[ShardPlan, Future]] = []

    def submit(i: int) -> None:
        pending.append((todo[i], pool.submit(_write_shard, root, classes, todo[i], out, blobs[i], unlabeled)))
        blobs[i] = {}
        while len(pending) > 2 * workers:
            plan, fut = pending.pop(0)
            fut.result()
            bar.update(len(plan.relpaths))

    done = [False] * len(todo)
    for name, data in source.stream(set(owner)):
        i = owner[name]
        blobs[i][name] = data
        if len(blobs[i]) == len(todo[i].relpaths):
            done[i] = True
            submit(i)
    for i, finished in enumerate(done):
        if not finished:  # the archive ended first: what was read is packed, the rest listed as skipped
            submit(i)
    for plan, fut in pending:
        fut.result()
        bar.update(len(plan.relpaths))


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
                raise DataError(
                    f"{out} holds shards packed from another source or with another --shard-mb; "
                    "pack into an empty folder (or rerun with the same source and shard size)"
                )
        return
    if shard_files(out):
        raise DataError(f"{out} holds shards that this pack did not plan; pack into an empty folder")
    record = {"plan": plan_key, "shards": len(plans), "files": [p.filename for p in plans]}
    write_bytes_atomic(uri, json.dumps(record).encode())


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
    tables = []
    for f in shard_files(out):
        pf = pq.ParquetFile(filesystem(f)[1], filesystem=fs)
        meta = schema.read_metadata(pf.schema_arrow)
        skipped.extend(meta.get("skipped", []))
        total_bytes += fs.get_file_info(filesystem(f)[1]).size
        t = pf.read(columns=["image_id", "label", "split"])
        tables.append(t)
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
        # What the shards hold (ids, labels, splits), for the shards of this data key: a stage computed
        # from other rows under the same shard names and sizes is never reused (ktray.lifecycle).
        "fingerprint": rows_fingerprint(pa.concat_tables(tables)) if tables else None,
        "fingerprint_key": data_key(out) if tables else None,
    }
    write_bytes_atomic(join(out, REPORT), json.dumps(report, indent=2).encode())
    return report


def info(path: str) -> dict[str, Any]:
    """The pack report of a shard directory (rebuilt from the shards when missing)."""
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no shards (expected files like train-00000.parquet)")
    check_complete(path)
    class_names(path)  # every shard carries the same classes
    fs, base = filesystem(join(path, REPORT))
    if fs.get_file_info(base).type == pafs.FileType.File:
        with fs.open_input_stream(base) as f:
            report = json.loads(f.read())
        if report.get("bytes") == sum(fs.get_file_info(filesystem(s)[1]).size for s in files):
            return report
    return _write_report(path, class_names(path), [], source=path)
