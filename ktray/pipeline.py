"""The pipeline: pretext -> embed -> cluster -> transfer -> evaluate, resumable and tracked.

Each stage's output folder is named by its config and inputs (``ktray.rundir``), so running
the pipeline again skips every stage whose manifest exists, and a changed parameter
recomputes exactly the stages downstream of it. Two processes that need the same stage at
the same time (Tune trials, a resubmitted job) take a lock on its folder: the second waits
and then finds it done, instead of computing it twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ktray.artifacts import STUDENT
from ktray.config import STAGES, Config
from ktray.data.shards import data_path
from ktray.rundir import StageDir, filesystem, join, write_bytes_atomic
from ktray.runtime import init_ray
from ktray.stages import cluster, embed, evaluate, pretext, transfer
from ktray.tracking import Tracker

log = logging.getLogger(__name__)


RUNS = {"pretext": pretext.run, "embed": embed.run, "cluster": cluster.run, "transfer": transfer.run,
        "evaluate": evaluate.run}


def run_stages(
    cfg: Config, until: str = "evaluate", force: str | None = None, tracker: Any = None, trunk: str | None = None
) -> dict[str, StageDir]:
    """Run the pipeline up to ``until``; ``force`` recomputes that stage and what follows it."""
    init_ray()
    forced = set(STAGES[STAGES.index(force):]) if force else set()
    out: dict[str, StageDir] = {}

    def step(stage: str, *inputs: Any, **kwargs: Any) -> StageDir:
        out[stage] = RUNS[stage](cfg, *inputs, force=stage in forced, tracker=tracker, **kwargs)
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
    # The transfer method says what its student learns from: the clusters, or the embeddings themselves.
    learns_from = transfer.METHODS[cfg.transfer.method].LEARNS_FROM
    labels = None
    if until == "cluster" or learns_from == "cluster":
        labels = step("cluster", features, images=data_path(cfg.data))
    if until == "cluster":
        return out
    student = step("transfer", labels if learns_from == "cluster" else features)
    if until == "transfer":
        return out
    step("evaluate", student.path(STUDENT), labels=labels, name="student")
    return out


def run_stage(cfg: Config, stage: str, trunk: str | None = None) -> StageDir:
    """``ktray <stage>``: that stage, after whatever upstream stages are not done yet."""
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
