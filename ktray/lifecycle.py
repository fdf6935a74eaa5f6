"""The one stage lifecycle: every stage is a :class:`StageSpec`, and :func:`ensure` runs it.

A stage module says *what* it computes and from what; this module says *how* any stage is
run, in one place:

    spec = StageSpec(name, cfg, params, inputs, compute, args)
    ensure(spec):  lock the folder ─► --force clears it ─► done? reuse ─► else: make the folder,
                   join Ray, time it, compute(cfg, folder, *args), write the manifest (last),
                   record events ─► log the stage to MLflow (computed or reused)

``params`` is written once and used three times: the folder's hash (``rundir.stage_dir``), the
manifest's ``config`` and the MLflow params, so the three can never disagree. ``inputs`` are
the upstream folders and data keys that also go into the hash; ``args`` are what ``compute``
receives after the config and the folder (often the same upstream folders).

Two processes that need the same stage at once (Tune trials, a resubmitted job) take a lock on
its folder: the second waits and then finds it done, instead of computing it twice.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow.fs as pafs

from ktray import metrics
from ktray.data.shards import data_fingerprint
from ktray.rundir import MANIFEST, StageDir, filesystem, record_event, stage_dir, write_manifest
from ktray.runtime import init_ray

if TYPE_CHECKING:
    from ktray.config import Config

log = logging.getLogger(__name__)


class StageDamaged(RuntimeError):
    """A finished stage folder whose manifest or files are damaged: never reused, never silently redone."""


@dataclass(frozen=True)
class Output:
    """What a stage's ``compute`` hands back: the files it wrote (relative to its folder) and its figures."""

    files: list[str]
    summary: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class Tracker(Protocol):
    def log_stage(self, sd: StageDir, *, reused: bool, params: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class StageSpec:
    """One stage computation: its name, what it depends on, and the function that does it."""

    name: str
    cfg: Config
    params: dict[str, Any]  # hashed, written to the manifest, logged to MLflow
    inputs: Sequence[StageDir | str]  # upstream folders and data keys (hashed)
    compute: Callable[..., Output]  # compute(cfg, stage_dir, *args) -> Output
    args: tuple[Any, ...] = ()
    check: Callable[[], object] | None = None  # boundary checks, run before the folder exists
    needs_ray: bool = True
    data: Sequence[str] = ()  # shard directories it reads: their fingerprints go in the manifest

    @cached_property
    def dir(self) -> StageDir:
        return stage_dir(self.cfg.root, self.name, self.params, self.inputs)


@contextmanager
def stage_lock(sd: StageDir) -> Iterator[None]:
    """Exclusive lock on a stage folder for as long as one process computes it.

    ``flock`` is released by the kernel when its holder dies, so a killed driver never leaves
    a stage locked. Object-store roots (s3://) have no such lock: there, concurrent trials
    may both compute a stage (the outputs are identical; the manifest rename is atomic).
    """
    if "://" in sd.uri:
        yield
        return
    lock_path = Path(filesystem(sd.uri)[1]).parent / ".locks" / f"{sd.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        t0 = time.time()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s is being computed by another process; waiting", sd.name)
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("%s: waited %.0f s", sd.name, time.time() - t0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear(sd: StageDir) -> None:
    """Forget a finished stage (``--force``): its manifest first, so it is never half done."""
    fs, path = filesystem(sd.uri)
    if sd.done():
        fs.delete_file(filesystem(sd.path(MANIFEST))[1])
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def stale_data(sd: StageDir, paths: Sequence[str]) -> str | None:
    """Why a done folder's results are not those of the data in ``paths`` now, or None.

    A folder's name hashes the data's shard names and sizes; its manifest records what the shards
    held (:func:`ktray.data.shards.data_fingerprint`), so rows relabelled or moved under the same
    names and sizes are caught here. A manifest without the record (an older run) is accepted.
    """
    recorded = sd.manifest().get("data")
    if not isinstance(recorded, list) or not recorded:
        return None
    was = {r.get("fingerprint") for r in recorded if isinstance(r, dict)}
    for path in paths:
        if data_fingerprint(path) not in was:
            return (f"it was computed from other rows than {path} holds now (image ids or labels changed under "
                    "the same shard names and sizes)")
    return None


def ensure(spec: StageSpec, *, force: bool = False, tracker: Tracker | None = None) -> StageDir:
    """The stage's folder, computed first unless it is done; logged to MLflow when ``tracker`` is given."""
    sd, root = spec.dir, spec.cfg.root
    with stage_lock(sd):
        if force:
            clear(sd)
        reused = sd.done()
        if reused and (problem := sd.damage() or stale_data(sd, spec.data)) is not None:
            raise StageDamaged(
                f"[{spec.name}] {sd.uri} is marked done but {problem}: recompute it with "
                f"`ktray run CONFIG --force {spec.name}` (or delete the folder)"
            )
        if reused:
            print(f"[{spec.name}] done already: {sd.uri}", flush=True)
            record_event(root, stage=spec.name, dir=sd.name, event="reused")
        else:
            print(f"[{spec.name}] running -> {sd.uri}", flush=True)
            record_event(root, stage=spec.name, dir=sd.name, event="started")
            started = time.time()
            if spec.check is not None:
                spec.check()  # a refused input leaves no folder behind
            data = [{"path": p, "fingerprint": data_fingerprint(p)} for p in spec.data]
            sd.make()
            if spec.needs_ray:
                init_ray()  # the job's cluster (RAY_ADDRESS) or a local one
            with metrics.stage_timer(spec.name):
                out = spec.compute(spec.cfg, sd, *spec.args)
            write_manifest(sd, config=spec.params, inputs=spec.inputs, files=out.files,
                           metrics={"summary": out.summary, "history": out.history}, started=started, data=data)
            seconds = time.time() - started
            record_event(root, stage=spec.name, dir=sd.name, event="finished", seconds=seconds)
            print(f"[{spec.name}] finished in {seconds:.0f} s: {sd.uri}", flush=True)
    if tracker is not None:
        tracker.log_stage(sd, reused=reused, params=spec.params)
    return sd
