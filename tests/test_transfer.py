"""Transfer: the join on image_id, the held-out split, balanced sampling, then the Ray Train stage."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from local_cluster import train_checkpoint_registered
from reliability.faults import Killer
from workloads import TRANSFER_FAST, real_label_clusters

from ktray import schema
from ktray.artifacts import STUDENT
from ktray.config import load_config
from ktray.data.shards import load_table
from ktray.data.subsets import is_held_out
from ktray.methods.cluster_classification import balanced_rates, join_clusters
from ktray.models.trunks import load_any_trunk, load_trunk
from ktray.stages import transfer


def own_cluster(image_id: str, k: int) -> int:
    """A cluster id that is a function of the id alone: what the join must reproduce per row."""
    return zlib.crc32(image_id.encode()) % k


@pytest.fixture(scope="module")
def train_ids(sample_shards: str) -> list[str]:
    return load_table(sample_shards, "train", ["image_id"])["image_id"].to_pylist()


def labels_table(ids: list[str], k: int, seed: int) -> pa.Table:
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    clusters = [own_cluster(i, k) for i in shuffled]
    table = pa.table(
        {
            "image_id": pa.array(shuffled, pa.string()),
            "cluster": pa.array(clusters, pa.int32()),
            "distance": pa.array(np.zeros(len(ids), np.float32)),
        },
        schema=schema.with_metadata(schema.LABELS, k=k),
    )
    schema.check_labels(table)
    return table


def test_join_gives_every_image_its_own_cluster_whatever_the_order(train_ids: list[str]) -> None:
    k = 37
    labels = labels_table(train_ids, k, seed=1)  # labels side shuffled
    for seed in (2, 3):
        order = np.random.default_rng(seed).permutation(len(train_ids))
        images = pa.table({"image_id": [train_ids[i] for i in order], "pos": order})  # images side shuffled
        joined = join_clusters(images, labels, part="all")
        assert joined.num_rows == len(train_ids)
        got = dict(zip(joined["image_id"].to_pylist(), joined["cluster"].to_pylist(), strict=True))
        assert got == {i: own_cluster(i, k) for i in train_ids}
        # Other columns travel with their own row.
        assert [train_ids[p] for p in joined["pos"].to_pylist()] == joined["image_id"].to_pylist()


def test_join_drops_images_without_a_label(train_ids: list[str]) -> None:
    labels = labels_table(train_ids[:500], 10, seed=0)
    out = join_clusters(pa.table({"image_id": train_ids}), labels, part="all")
    assert sorted(out["image_id"].to_pylist()) == sorted(train_ids[:500])
    assert join_clusters(pa.table({"image_id": ["not-an-image"]}), labels, part="all").num_rows == 0


def test_holdout_is_order_free_and_disjoint(train_ids: list[str]) -> None:
    held = dict(zip(train_ids, is_held_out(train_ids, 0.2, seed=0), strict=True))
    rev = train_ids[::-1]
    assert dict(zip(rev, is_held_out(rev, 0.2, seed=0), strict=True)) == held
    n = len(train_ids)
    assert abs(sum(held.values()) - 0.2 * n) < 5 * math.sqrt(0.2 * 0.8 * n)  # Binomial(n, 0.2), 5 sigma
    labels = labels_table(train_ids, 10, seed=0)
    images = pa.table({"image_id": train_ids})
    tr = join_clusters(images, labels, "train", 0.2, seed=0)["image_id"].to_pylist()
    ho = join_clusters(images, labels, "holdout", 0.2, seed=0)["image_id"].to_pylist()
    assert not set(tr) & set(ho) and len(tr) + len(ho) == n
    assert set(ho) == {i for i, h in held.items() if h}


def test_balanced_sampling_is_uniform_over_clusters() -> None:
    # Skewed clusters: sizes 400, 100, 20, 5 and one empty cluster (id 4).
    sizes = [400, 100, 20, 5]
    clusters = np.repeat(np.arange(4), sizes)
    ids = [f"img{i}" for i in range(len(clusters))]
    labels = pa.table({"image_id": ids, "cluster": pa.array(clusters, pa.int32())})
    rates = balanced_rates(clusters, k=5)
    assert rates[4] == 0 and np.allclose(rates[:4] * sizes, len(ids) / 4)
    epochs = 40
    totals = np.zeros(5)
    for _ in range(epochs):
        out = join_clusters(pa.table({"image_id": ids}), labels, "train", rates=rates)
        totals += np.bincount(out["cluster"].to_numpy(), minlength=5)
    # Each non-empty cluster: a sum of Poissons with mean N/4 per epoch; 5 sigma over all epochs.
    mean = epochs * len(ids) / 4
    assert totals[4] == 0
    assert np.all(np.abs(totals[:4] - mean) < 5 * math.sqrt(mean)), totals
    # Without balancing every image appears once: the skew stays.
    plain = join_clusters(pa.table({"image_id": ids}), labels, "train")
    assert np.array_equal(np.bincount(plain["cluster"].to_numpy()), sizes)


# ----------------------------------------------------------------------------- the stage (Ray Train)



@pytest.mark.slow
def test_transfer_learns_and_survives_a_killed_worker(ray_session: None, sample_shards: str, run_root: str) -> None:
    """The stage on the shared training harness (``ktray.training``): a Ray Train worker SIGKILLed
    after the first checkpoint restarts the group from it. The harness's other fault, a killed
    driver resumed by a rerun, is the same code for every stage; test_pretext kills both."""
    labels = real_label_clusters(run_root, sample_shards)
    epochs = 4
    cfg = load_config(None, [f"root={run_root}", *TRANSFER_FAST, f"transfer.epochs={epochs}"])
    sd = transfer.output_dir(cfg, labels)

    with Killer("RayTrainWorker", ready=lambda: train_checkpoint_registered(sd.uri, 1),
                running=lambda: not sd.done(), delay=1.5) as kill:
        out = transfer.run(cfg, labels)
    assert kill.pids and kill.stage_running, kill.error or "the worker kill landed after the stage finished"
    assert out == sd and sd.done()
    metrics = sd.manifest()["metrics"]
    summary, history = metrics["summary"], metrics["history"]
    assert [h["step"] for h in history] == list(range(1, epochs + 1)), "an epoch is missing or twice"
    # Two starts: the first group's, and the restarted group's from a checkpoint it left.
    starts = json.loads((max(Path(sd.uri).glob("checkpoint_epoch_*")) / "meta.json").read_text())["starts"]
    assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < epochs, starts
    assert summary["resumed_from_epoch"] == starts[1]
    # It learns: the training loss falls (ln 10 = 2.30 at chance).
    assert history[-1]["loss"] < history[0]["loss"]
    assert summary["num_classes"] == 10 and summary["chance"] == 0.1 and summary["images_per_s"] > 0
    # Pseudo-label accuracy is scored on exactly the held-out labeled images (one worker: no remainder cut).
    ids = pq.read_table(labels.path("labels.parquet"))["image_id"].to_pylist()
    assert history[-1]["val_n"] == is_held_out(ids, cfg.transfer.holdout_fraction, cfg.seed).sum() > 0
    assert 0 <= summary["holdout_acc"] <= 1
    # The weights file is a trunk the evaluate stage reads back, with every tap.
    trunk = load_trunk(sd.path(STUDENT))
    assert trunk.arch == "alexnet" and trunk.width == 0.25
    assert load_any_trunk(sd.path(STUDENT)).taps is not None
