"""The run directory: one folder per stage output, named by what it was computed from.

    <root>/pretext-3f2a9c1e04/      manifest.json, permutations.npy, teacher.pt, checkpoints
    <root>/embed-9b0c17d2aa/        manifest.json, features/*.parquet
    <root>/cluster-51e0d7f3b2/      manifest.json, labels.parquet, centroids.npy, plots

A folder's name is the stage and a hash of the stage's config section, the hashes of its
inputs and the data it read, so a changed parameter lands in a new folder and everything
downstream of it follows; what did not change is found done and skipped. A stage is done
when its ``manifest.json`` exists: it is written last and atomically (a temporary name,
then a rename), so a killed stage is never mistaken for a finished one.

The root is a local path or any URI ``pyarrow.fs`` opens (``s3://bucket/runs``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
_VERSIONED = ("ktray", "ray", "torch", "torchvision", "faiss-cpu", "faiss-gpu", "pyarrow", "numpy", "mlflow")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI; local paths are made absolute."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """``uri/part/...``; a part that is absolute or climbs out (``..``) is refused, so no name can escape."""
    for part in parts:
        if part.startswith("/") or ".." in part.split("/") or "\\" in part:
            raise ValueError(f"refusing path part {part!r} below {uri}: it would leave the folder")
    return "/".join([uri.rstrip("/"), *parts])


def config_hash(*items: Any) -> str:
    """Stable short hash of JSON-able items (dict keys sorted)."""
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


@dataclass(frozen=True)
class StageDir:
    """Where one stage output lives; ``uri`` is absolute (a local path or a URI)."""

    stage: str
    key: str
    uri: str

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.key}"

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def done(self) -> bool:
        fs, path = filesystem(self.path(MANIFEST))
        return fs.get_file_info(path).type == pafs.FileType.File

    def manifest(self) -> dict[str, Any]:
        return json.loads(read_bytes(self.path(MANIFEST)))

    def damage(self) -> str | None:
        """What is wrong with a done folder (a torn manifest, a listed file gone), or None when it is whole."""
        try:
            manifest = self.manifest()
        except (ValueError, OSError) as exc:
            return f"its {MANIFEST} cannot be read ({type(exc).__name__})"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return f"its {MANIFEST} has no list of files"
        fs, _ = filesystem(self.uri)
        missing = [f for f in files if fs.get_file_info(filesystem(self.path(f))[1]).type == pafs.FileType.NotFound]
        return f"{len(missing)} of its files are gone ({', '.join(missing[:3])})" if missing else None

    def make(self) -> None:
        fs, path = filesystem(self.uri)
        fs.create_dir(path, recursive=True)


def stage_dir(root: str, stage: str, config: Any, inputs: Sequence[StageDir | str] = ()) -> StageDir:
    """The folder for ``stage`` computed with ``config`` from ``inputs`` (stage dirs or data keys)."""
    input_keys = [i.name if isinstance(i, StageDir) else i for i in inputs]
    key = config_hash(stage, config, input_keys)
    _, base = filesystem(root)
    prefix = root.split("://", 1)[0] + "://" if "://" in root else ""
    return StageDir(stage, key, join(prefix + base if prefix else base, f"{stage}-{key}"))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees either nothing or all of it."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores publish a PUT whole or not at all
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_npy(uri: str, arr: Any) -> None:
    """``arr`` as a ``.npy`` file (no pickles), written atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    write_bytes_atomic(uri, buf.getvalue())


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(
    sd: StageDir,
    *,
    config: Any,
    inputs: Sequence[StageDir | str] = (),
    files: Sequence[str] = (),
    metrics: dict[str, Any] | None = None,
    started: float | None = None,
    data: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Mark ``sd`` done: the last write of a stage. ``data``: the path and fingerprint of each shard
    directory it read (checked before the folder is reused)."""
    manifest = {
        "stage": sd.stage,
        "key": sd.key,
        "config": config,
        "inputs": [i.name if isinstance(i, StageDir) else i for i in inputs],
        "files": list(files),
        "metrics": metrics or {},
        "data": list(data),
        "versions": package_versions(),
        "started": started,
        "finished": time.time(),
    }
    write_bytes_atomic(sd.path(MANIFEST), json.dumps(manifest, indent=2, default=str).encode())
    return manifest


EVENTS = "events.jsonl"


def record_event(root: str, **event: Any) -> None:
    """Append one line to ``<root>/events.jsonl``: which stage was computed or reused, when, by whom.

    An operator's record (and the tests' evidence that a stage ran exactly once). Local
    roots only: object stores have no append; there the manifests are the record.
    """
    if "://" in root:
        return
    line = json.dumps({"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **event})
    path = Path(filesystem(root)[1]) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # O_APPEND: concurrent writers never interleave one short line
        f.write(line + "\n")


def read_events(root: str) -> list[dict[str, Any]]:
    path = Path(filesystem(root)[1]) / EVENTS
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a writer killed mid-append: not an event
            continue
    return events
