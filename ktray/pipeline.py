"""The pipeline: pretext -> embed -> cluster -> transfer -> evaluate, resumable and tracked.

Each stage's output folder is named by its config and inputs (``ktray.rundir``), so running
the pipeline again skips every stage whose manifest exists, and a changed parameter
recomputes exactly the stages downstream of it. Two processes that need the same stage at
the same time (Tune trials, a resubmitted job) take a lock on its folder: the second waits
and then finds it done, instead of computing it twice.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ktray import metrics
from ktray.config import Config
from ktray.rundir import StageDir, filesystem, join, record_event, write_bytes_atomic

log = logging.getLogger(__name__)

STAGES = ("pretext", "embed", "cluster", "transfer", "evaluate")


@dataclass(frozen=True)
class Stage:
    """How the pipeline drives one stage: where its output goes and how to compute it."""

    name: str
    output_dir: Callable[..., StageDir]
    run: Callable[..., StageDir]
    params: Callable[[Config], dict[str, Any]]


def _pretext_params(c: Config) -> dict[str, Any]:
    isd = {"isd": c.isd.to_dict()} if c.pretext.method == "isd" else {}
    return {"pretext": c.pretext.to_dict(), **isd}


def _registry() -> dict[str, Stage]:
    from ktray import embed, evaluate, kmeans, pretext, transfer

    return {
        "pretext": Stage("pretext", pretext.output_dir, pretext.run, _pretext_params),
        "embed": Stage("embed", embed.output_dir, embed.run, lambda c: {"embed": c.embed.to_dict()}),
        "cluster": Stage("cluster", kmeans.output_dir, kmeans.run, lambda c: {"cluster": c.cluster.to_dict()}),
        "transfer": Stage("transfer", transfer.output_dir, transfer.run, lambda c: {"transfer": c.transfer.to_dict()}),
        "evaluate": Stage("evaluate", evaluate.output_dir, evaluate.run, lambda c: {"evaluate": c.evaluate.to_dict()}),
    }


@contextmanager
def stage_lock(sd: StageDir) -> Iterator[None]:
    """Exclusive lock on a stage folder for as long as one process computes it.

    ``flock`` is released by the kernel when its holder dies, so a killed driver never leaves
    a stage locked. Object-store roots (s3://) have no such lock: there, concurrent trials
    may both compute a stage (the outputs are identical; the manifest rename is atomic).
    """
    _, path = filesystem(sd.uri)
    if "://" in sd.uri:
        yield
        return
    lock_path = Path(path).parent / ".locks" / f"{sd.name}.lock"
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
    import pyarrow.fs as pafs

    fs, path = filesystem(sd.uri)
    if sd.done():
        fs.delete_file(filesystem(sd.path("manifest.json"))[1])
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def ensure(cfg: Config, stage: str, *inputs: Any, force: bool = False, tracker: Any = None, **kwargs: Any) -> StageDir:
    """Compute ``stage`` from ``inputs`` unless its folder is done; log it to MLflow."""
    st = _registry()[stage]
    sd = st.output_dir(cfg, *inputs, **kwargs)
    with stage_lock(sd):
        if force:
            clear(sd)
        reused = sd.done()
        if reused:
            print(f"[{stage}] done already: {sd.uri}", flush=True)
            record_event(cfg.root, stage=stage, dir=sd.name, event="reused")
        else:
            print(f"[{stage}] running -> {sd.uri}", flush=True)
            record_event(cfg.root, stage=stage, dir=sd.name, event="started")
            t0 = time.time()
            with metrics.stage_timer(stage):
                out = st.run(cfg, *inputs, **kwargs)
            if out.uri != sd.uri:
                raise RuntimeError(f"{stage}: wrote {out.uri}, but the pipeline planned {sd.uri}")
            record_event(cfg.root, stage=stage, dir=sd.name, event="finished", seconds=time.time() - t0)
            print(f"[{stage}] finished in {time.time() - t0:.0f} s: {sd.uri}", flush=True)
    if tracker is not None:
        tracker.log_stage(sd, reused=reused, params=st.params(cfg))
    return sd


def init_ray(attempts: int = 3, **kwargs: Any) -> None:
    """Join the Ray cluster this job runs on (``RAY_ADDRESS``), or start a local one (``kwargs`` go to ``ray.init``).

    Retried: on a loaded machine a local raylet can miss Ray's fixed 30 s registration
    deadline, and Ray raises a bare ``Exception`` for that.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs = {"log_to_driver": True, "configure_logging": False, **kwargs}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("ray.init failed (%s); retrying (%d/%d)", exc, attempt + 1, attempts)
            time.sleep(2.0 * attempt)


def run_stages(
    cfg: Config, until: str = "evaluate", force: str | None = None, tracker: Any = None, trunk: str | None = None
) -> dict[str, StageDir]:
    """Run the pipeline up to ``until``; ``force`` recomputes that stage and what follows it."""
    from ktray.data import data_path

    init_ray()
    forced = set(STAGES[STAGES.index(force):]) if force else set()
    out: dict[str, StageDir] = {}

    def step(stage: str, *inputs: Any, **kwargs: Any) -> StageDir:
        out[stage] = ensure(cfg, stage, *inputs, force=stage in forced, tracker=tracker, **kwargs)
        return out[stage]

    if trunk is not None and until == "evaluate":
        step("evaluate", trunk, name=Path(trunk).stem)
        return out
    teacher = step("pretext")
    if until == "pretext":
        return out
    features = step("embed", teacher)
    if until == "embed":
        return out
    distill = cfg.transfer.method == "distill"
    labels = None
    if until == "cluster" or not distill:
        labels = step("cluster", features, images=data_path(cfg.data))
    if until == "cluster":
        return out
    # Cluster classification learns from the clusters; distillation from the teacher's embeddings.
    student = step("transfer", features if distill else labels)
    if until == "transfer":
        return out
    step("evaluate", student.path("student.pt"), labels=labels, name="student")
    return out


def run_stage(cfg: Config, stage: str, trunk: str | None = None) -> StageDir:
    """``ktray <stage>``: that stage, after whatever upstream stages are not done yet."""
    from ktray.tracking import Tracker

    tracker = Tracker(cfg)
    with tracker.pipeline_run(f"{cfg.name}:{stage}"):
        return run_stages(cfg, until=stage, tracker=tracker, trunk=trunk)[stage]


def summary(stages: dict[str, StageDir]) -> list[tuple[str, str, str]]:
    """(stage, metric, value) rows of each stage's headline figures."""
    rows = []
    for stage, sd in stages.items():
        for key, value in sd.manifest().get("metrics", {}).get("summary", {}).items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append((stage, key, text))
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    width = max((len(r[1]) for r in rows), default=10)
    lines = [f"| stage | {'metric':<{width}} | value |", f"|---|{'-' * (width + 2)}|---|"]
    lines += [f"| {s} | {m:<{width}} | {v} |" for s, m, v in rows]
    return "\n".join(lines)


def run(cfg: Config, force: str | None = None) -> dict[str, StageDir]:
    """``ktray run``: the whole pipeline, a parent MLflow run, and a summary table."""
    from ktray.tracking import Tracker

    t0 = time.time()
    tracker = Tracker(cfg)  # an unreachable tracking server is reported here, before any work
    with tracker.pipeline_run(cfg.name, tags={"ktray.root": cfg.root}):
        stages = run_stages(cfg, force=force, tracker=tracker)
        table = format_table(summary(stages))
        uri = join(stages["evaluate"].uri, "summary.md")
        write_bytes_atomic(uri, (table + "\n").encode())
        if "://" not in uri:
            tracker.log_table(filesystem(uri)[1])
    print()
    for stage, sd in stages.items():
        print(f"{stage:<9} {sd.uri}")
    print()
    print(table)
    print(f"\npipeline finished in {time.time() - t0:.0f} s; MLflow: {tracker.uri}")
    return stages
