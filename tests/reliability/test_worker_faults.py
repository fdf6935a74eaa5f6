"""Faults inside a running stage: a process of the stage's own Ray cluster is SIGKILLed mid-work.

- A training worker: tested inside the training stages' own kill tests (test_pretext.py,
  test_transfer.py), on the run that resumes after a killed driver: Ray Train's FailureConfig
  restarts the worker group from the last registered checkpoint and the run finishes with
  every epoch once in its history.
- An embed actor: Ray Data restarts it and retries its batches; the features hold every
  image exactly once.
- A k-means actor: Ray restarts it, it reloads its partition from the features files, and
  the labels and centroids equal those of an undisturbed run with the same seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from faults import Killer
from workloads import random_teacher

from ktray.config import Config, replace
from ktray.data.shards import image_ids
from ktray.stages import cluster, embed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # minutes on CI; more on a loaded machine


def test_embed_actor_killed(ray_session: None, sample_shards: str, run_root: str) -> None:
    n = 400
    teacher = random_teacher(run_root)
    cfg = replace(Config(root=run_root), [
        f"data.limit={n}", "embed.image_size=96", "embed.grid=2", "embed.batch_size=16", "embed.num_actors=2",
        "compute.device=cpu",
    ])
    sd = embed.output_dir(cfg, teacher)
    # The fault: one embed actor process dies by SIGKILL while the stream runs through it.
    with Killer("MapWorker", ready=lambda: True, running=lambda: not sd.done(), delay=3.0) as kill:
        out = embed.run(cfg, teacher)
    assert kill.pids and kill.stage_running, kill.error or "the kill landed after the stage finished"
    ids = pq.read_table(out.path("features"), columns=["image_id"])["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n, "an image is missing or embedded twice"
    assert set(ids) == set(image_ids(sample_shards, "train", n).to_pylist())


def test_kmeans_actor_killed(ray_session: None, sample_shards: str, tmp_path: Path) -> None:
    root = str(tmp_path / "runs")
    teacher = random_teacher(root)
    base = replace(Config(root=root), [
        "data.limit=400", "embed.image_size=64", "embed.grid=2", "compute.device=cpu",
        # 600 Lloyd iterations of 5-15 ms: seconds of iterating, so the kill lands inside them (at 60
        # the iterations took 0.4 s and the kill could land after the stage had finished).
        "cluster.k=20", "cluster.niter=600", "cluster.num_actors=2",
    ])
    features = embed.run(base, teacher)
    clean = cluster.run(replace(base, [f"root={tmp_path / 'clean'}"]), features)
    cfg = replace(base, [f"root={tmp_path / 'killed'}"])
    sd = cluster.output_dir(cfg, features)
    # The fault: one k-means actor process dies by SIGKILL between or during Lloyd iterations.
    with Killer("KMeansShard", ready=lambda: True, running=lambda: not sd.done(), delay=2.0) as kill:
        out = cluster.run(cfg, features)
    assert kill.pids and kill.stage_running, kill.error or "the kill landed after the stage finished"
    a, b = (pq.read_table(s.path("labels.parquet")).sort_by("image_id") for s in (clean, out))
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()
    assert a["cluster"].to_pylist() == b["cluster"].to_pylist()
    np.testing.assert_array_equal(np.load(clean.path("centroids.npy")), np.load(out.path("centroids.npy")))
    assert os.path.exists(out.path("stats.json"))
