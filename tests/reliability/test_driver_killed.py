"""Fault: the driver, ``ktray run``, is SIGKILLed together with its local Ray at random points.

Must: after each kill, nothing half-written is visible to a later stage (every stage folder
with a manifest holds every file it lists, readable); running the same command again
finishes the pipeline, reusing what was complete (no stage finished twice), with every
train image exactly once in the features and in the labels.

The kill points are drawn from a seeded RNG (``KTRAY_FAULT_SEED``, printed on failure): a
stage, and a delay after that stage started.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faults import kill_session, start_run, wait_for_event
from workloads import FAST_PIPELINE

from ktray.config import STAGES, load_config
from ktray.data.shards import image_ids, sample_path
from ktray.rundir import read_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # minutes on CI; more on a loaded machine
SEED = int(os.environ.get("KTRAY_FAULT_SEED", "20261122"))


def kill_points(seed: int, n: int = 2) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    stages = sorted(rng.sample(STAGES, n), key=STAGES.index)
    return [(stage, round(rng.uniform(0.5, 8.0), 1)) for stage in stages]


def assert_nothing_half_written(root: Path) -> int:
    """Every finished stage folder holds every file its manifest lists, each readable; returns the count."""
    done = 0
    for manifest in root.glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        for rel in m.get("files", []):
            path = manifest.parent / rel
            assert path.exists(), f"{manifest.parent.name} lists {rel}, which is missing"
            if path.is_file() and rel.endswith(".parquet"):
                pq.read_table(path)
            elif path.is_dir():
                for part in path.glob("*.parquet"):
                    pq.read_table(part)
        assert not list(manifest.parent.rglob("*.tmp*")), f"temporary files left in finished {manifest.parent.name}"
        done += 1
    return done


def test_driver_killed_at_random_points_then_rerun(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    log = tmp_path / "driver.log"
    points = kill_points(SEED)
    started: Counter[str] = Counter()
    for stage, delay in points:
        proc = start_run(str(root), log)
        started[stage] += 1
        reached = wait_for_event(str(root), proc, stage, "started", started[stage])
        if reached:
            time.sleep(delay)
        kill_session(proc)
        assert proc.returncode is not None
        assert_nothing_half_written(root)
        events = read_events(str(root))
        # A stage that did finish is never computed again.
        started = Counter(e["stage"] for e in events if e["event"] == "started")

    proc = start_run(str(root), log)
    assert proc.wait(1200) == 0, f"kill points {points} (seed {SEED}):\n" + log.read_text()[-4000:]
    assert assert_nothing_half_written(root) == len(STAGES)

    events = read_events(str(root))
    finished = Counter(e["stage"] for e in events if e["event"] == "finished")
    assert finished == Counter(STAGES), f"a stage finished twice or never: {finished} (kill points {points})"

    cfg = load_config("tiny", [f"root={root}", *FAST_PIPELINE])
    want = sorted(image_ids(sample_path(), cfg.data.train_split, cfg.data.limit).to_pylist())
    (features,) = root.glob("embed-*/features")
    (labels,) = root.glob("cluster-*/labels.parquet")
    assert sorted(pq.read_table(features, columns=["image_id"])["image_id"].to_pylist()) == want
    assert sorted(pq.read_table(labels, columns=["image_id"])["image_id"].to_pylist()) == want
    assert list(root.glob("evaluate-*/summary.md"))
