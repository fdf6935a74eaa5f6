"""Faults inside a running stage: a process of the stage's own Ray cluster is SIGKILLed mid-work.

- A training worker (pretext, transfer): Ray Train's FailureConfig restarts the worker group
  from the last epoch checkpoint; the run finishes with every epoch once in its history (and
  once in MLflow), and its final metrics are within noise of an undisturbed run.
- An embed actor: Ray Data restarts it and retries its batches; the features hold every
  image exactly once.
- A k-means actor: Ray restarts it, it reloads its partition from the features files, and
  the labels and centroids equal those of an undisturbed run with the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from faults import Killer
from local_cluster import MlflowServer, train_checkpoint_registered
from workloads import TRANSFER_FAST, pretext_overrides, random_teacher, real_label_clusters

from ktray.config import Config, load_config, replace
from ktray.data.shards import image_ids
from ktray.rundir import StageDir
from ktray.stages import cluster, embed, pretext, transfer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # minutes on CI; more on a loaded machine
EPOCHS = 3


def _pretext(root: str, sample_shards: str) -> tuple[Config, Callable[[], StageDir]]:
    cfg = load_config(None, [*pretext_overrides(root), f"pretext.epochs={EPOCHS}"])
    return cfg, lambda: pretext.run(cfg)


def _transfer(root: str, sample_shards: str) -> tuple[Config, Callable[[], StageDir]]:
    labels = real_label_clusters(root, sample_shards)
    cfg = load_config(None, [f"root={root}", *TRANSFER_FAST, f"transfer.epochs={EPOCHS}",
                             "compute.num_workers=2", "compute.cpus_per_worker=0.5"])
    return cfg, lambda: transfer.run(cfg, labels)


def _brief(history: list[dict[str, float]]) -> list[tuple[int, float, float]]:
    return [(int(h["step"]), round(h["loss"], 3), round(h.get("val_acc", -1), 3)) for h in history]


STAGES = {"pretext": (_pretext, pretext.output_dir), "transfer": (_transfer, transfer.output_dir)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_training_worker_killed_mid_epoch(
    stage: str, ray_session: None, sample_shards: str, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    from mlflow import MlflowClient

    from ktray.tracking import Tracker

    make, _ = STAGES[stage]
    _, clean_run = make(str(tmp_path / "clean"), sample_shards)
    clean = clean_run().manifest()["metrics"]

    cfg, run = make(str(tmp_path / "killed"), sample_shards)
    sd = STAGES[stage][1](cfg, *([] if stage == "pretext" else [real_label_clusters(cfg.root, sample_shards)]))
    # The fault: one Ray Train worker process dies by SIGKILL a moment into epoch 2, once Train has
    # registered epoch 1's checkpoint (a kill before that restarts from scratch, by design).
    with Killer("RayTrainWorker", ready=lambda: train_checkpoint_registered(sd.uri, 1),
                running=lambda: not sd.done(), delay=1.5) as kill:
        out = run()
    assert kill.pids and kill.stage_running, kill.error or "the kill landed after the stage finished"

    metrics = out.manifest()["metrics"]
    history, summary = metrics["history"], metrics["summary"]
    seen = f"killed run {_brief(history)}, summary {summary}; undisturbed {_brief(clean['history'])}"
    assert [h["step"] for h in history] == list(range(1, EPOCHS + 1)), f"an epoch is missing or twice: {seen}"
    assert summary["resumed_from_epoch"] >= 1, f"the worker group did not restart from a checkpoint: {seen}"
    # Within noise of the undisturbed run: the same schedule, a different data order after the restart
    # (that training learns at all is test_pretext's and test_transfer's business).
    assert abs(history[-1]["loss"] - clean["history"][-1]["loss"]) < 0.25 * clean["history"][-1]["loss"], seen
    assert abs(history[-1]["val_acc"] - clean["history"][-1]["val_acc"]) < 0.25, seen

    # MLflow gets each epoch once: the driver replays the manifest, whose steps are unique.
    tracked = replace(cfg, [f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=worker-kill-{stage}"])
    tracker = Tracker(tracked)
    with tracker.pipeline_run("worker-kill") as parent:
        tracker.log_stage(out, reused=False)
    client = MlflowClient(mlflow_server.uri)
    (child,) = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))


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
