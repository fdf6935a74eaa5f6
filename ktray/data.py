"""Image shards: pack an image collection into Parquet, read it back as a Ray dataset.

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

import io
import json
import logging
import os
import re
import tarfile
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ktray import metrics, schema
from ktray.rundir import config_hash, filesystem, join, write_bytes_atomic

if TYPE_CHECKING:
    import ray.data

    from ktray.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLIT_NAMES = ("train", "val", "test")
REPORT = "pack_report.json"
PLAN = ".pack_plan.json"
# Larger images are refused before their pixels are decoded (decompression-bomb guard):
# ImageNet's largest photos are ~4000x3000 = 12 Mpx; 10000x10000 is refused.
MAX_PIXELS = 64_000_000
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})\.parquet$")


# --------------------------------------------------------------------------- decoding


class DecodeError(ValueError):
    """Bytes that are not a decodable image within the limits."""


def open_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Open encoded bytes as an RGB PIL image, or raise DecodeError saying why.

    Greyscale, palette and CMYK become RGB; alpha is composited onto white; 16-bit
    images are scaled to 8 bits. ``draft_size`` lets JPEG decode at a reduced scale
    (DCT scaling), which is exact enough for any target at least that large and
    several times faster.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise DecodeError(f"{w}x{h} exceeds the {MAX_PIXELS:,} pixel limit (decompression-bomb guard)")
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except Exception as exc:  # PIL raises many types for bad data; all mean "skip this file"
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if min(img.size) < 1:
        raise DecodeError("image has no pixels")
    return img


def _random_resized_box(
    w: int, h: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0)
) -> tuple[int, int, int, int]:
    """Inception-style random crop box (area scale, aspect 3/4..4/3), as torchvision's."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    side = min(w, h)  # fall back to a center square
    return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


def decode_image(
    data: bytes,
    size: int,
    mode: Literal["center", "random"] = "center",
    rng: np.random.Generator | None = None,
) -> np.ndarray | None:
    """Encoded bytes -> uint8 (size, size, 3), or None when the bytes are not an image.

    ``center``: resize the short side to ``size`` and take the center square (evaluation).
    ``random``: random resized crop and horizontal flip (training augmentation).
    """
    try:
        img = open_rgb(data, draft_size=size)
    except DecodeError:
        return None
    w, h = img.size
    if mode == "center":
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    else:
        rng = rng if rng is not None else np.random.default_rng()
        box = _random_resized_box(w, h, rng)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)
    if mode == "random" and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int,
    mode: Literal["center", "random"] = "center",
    seed: int | None = None,
    stage: str = "data",
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: decode a batch of image rows.

    Returns ``image_id``, ``pixels`` (N, size, size, 3) uint8 and ``label`` (int32, -1 when
    unlabeled). Rows whose bytes do not decode are dropped and logged, so one bad image
    never stops a stage. Decoded and failed counts go to the ``ktray_images_*`` metrics.
    """
    rng = np.random.default_rng(seed)
    ids, pixels, labels = [], [], []
    raw_labels = batch.get("label")
    for i, (image_id, data) in enumerate(zip(batch["image_id"], batch["image"])):
        arr = decode_image(bytes(data), size, mode, rng)
        if arr is None:
            log.warning("skipping undecodable image %s", image_id)
            continue
        ids.append(image_id)
        pixels.append(arr)
        label = None if raw_labels is None else raw_labels[i]
        labels.append(-1 if label is None or (isinstance(label, float) and np.isnan(label)) else int(label))
    metrics.record_decode(ok=len(ids), failed=len(batch["image_id"]) - len(ids), stage=stage)
    return {
        "image_id": np.asarray(ids, dtype=object),
        "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "label": np.asarray(labels, dtype=np.int32),
    }


# --------------------------------------------------------------------------- sources


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


# --------------------------------------------------------------------------- packing


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


def shard_files(path: str, split: str | None = None) -> list[str]:
    """Sorted shard paths (URIs when ``path`` is one) of ``split`` or of every split."""
    fs, base = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted(
        i.base_name for i in infos
        if (m := _SHARD_RE.match(i.base_name)) and (split is None or m["split"] == split)
    )
    prefix = path.rstrip("/") if "://" in path else base
    return [f"{prefix}/{n}" for n in names]


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


# --------------------------------------------------------------------------- reading


def sample_path() -> str:
    """The bundled sample's shards (real Imagenette photos; see ktray/sample/README.md)."""
    return str(Path(__file__).resolve().parent / "sample")


def data_path(cfg: DataConfig) -> str:
    return cfg.path or sample_path()


def data_key(path: str) -> str:
    """Identity of a shard directory for the run directory's hashes: names and sizes."""
    fs, _ = filesystem(path)
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no shards (expected files like train-00000.parquet)")
    return "data-" + config_hash([(Path(f).name, fs.get_file_info(filesystem(f)[1]).size) for f in files])


def class_names(path: str) -> list[str]:
    files = shard_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no shards")
    fs, p = filesystem(files[0])
    return list(schema.read_metadata(pq.read_schema(p, filesystem=fs)).get("classes", []))


def load_table(path: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read shards on the driver (small tables: ids and labels, not images at scale)."""
    files = shard_files(path, split)
    if not files:
        raise FileNotFoundError(f"{path}: no shards for split {split!r}")
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


# A limited run takes the classes in turn, so 200 images of a class-sorted set still span every
# class (the first 200 rows were 2 classes of the bundled sample). Folders computed under the old
# rule (the first rows) must not be reused: the rule is part of every limited stage's hash.
LIMIT_ORDER = "classes-in-turn"


def limited_indices(table: pa.Table, limit: int) -> np.ndarray:
    """Which rows of ``table`` a limited run uses, ascending: the first image of each class, then
    the second of each, and so on (unlabelled rows count as one class). No limit: all."""
    n = table.num_rows
    if not limit or limit >= n:
        return np.arange(n)
    labels = (table["label"].fill_null(-1).to_numpy(zero_copy_only=False) if "label" in table.column_names
              else np.zeros(n, np.int64))
    by_class = np.argsort(labels, kind="stable")  # rows grouped by class, table order within a class
    starts = np.searchsorted(labels[by_class], labels[by_class])  # where each row's class begins
    rank = np.empty(n, np.int64)
    rank[by_class] = np.arange(n) - starts  # the row's place within its class
    return np.sort(np.lexsort((np.arange(n), rank))[:limit])


def limited_rows(table: pa.Table, limit: int) -> pa.Table:
    """The rows of ``table`` a limited run uses (:func:`limited_indices`), in table order."""
    return table if not limit or limit >= table.num_rows else table.take(pa.array(limited_indices(table, limit)))


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


# --------------------------------------------------------------------------- long-tailed subset


def long_tail_counts(sizes: np.ndarray, ratio: float, order: np.ndarray) -> np.ndarray:
    """Images kept per class, ``(C,)``: the ``i``-th class of ``order`` keeps ``n * r**i``, ``r = ratio**(-1/(C-1))``.

    ``n`` is the largest class's size, so the head class keeps everything and the last class
    ``n / ratio`` (at least 1); no class keeps more than it has.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    c = len(sizes)
    if c < 2 or ratio <= 1:
        return sizes.copy()
    r = float(ratio) ** (-1.0 / (c - 1))
    want = np.empty(c, dtype=np.int64)
    want[order] = np.maximum(1, np.floor(sizes.max() * r ** np.arange(c) + 1e-9)).astype(np.int64)
    return np.minimum(want, sizes)


def long_tail_mask(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Which rows of a labelled split form its long-tailed subset (a seeded, deterministic choice).

    Classes are ranked by a seeded permutation (so the head class is not always class 0),
    each keeps :func:`long_tail_counts` of its images chosen at random; unlabelled rows
    (label < 0) have no class and are dropped. The labels choose the subset and nothing else.
    """
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        return keep
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))
    sizes = np.array([(labels == c).sum() for c in classes])
    counts = long_tail_counts(sizes, ratio, order)
    for c, n in zip(classes, counts, strict=True):
        rows = np.flatnonzero(labels == c)
        keep[rng.choice(rows, size=int(n), replace=False)] = True
    return keep


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


def iter_entries(path: str) -> Iterator[str]:
    """Every image_id in a shard directory (for tests and checks)."""
    for f in shard_files(path):
        fs, p = filesystem(f)
        yield from pq.read_table(p, filesystem=fs, columns=["image_id"])["image_id"].to_pylist()
