"""The pretext stage on a real local Ray: 2 CPU workers, real checkpoints, real SIGKILLs (driver, then worker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from local_cluster import train_checkpoint_registered
from reliability.faults import Killer
from workloads import pretext_overrides

from ktray.algos.jigsaw import generate_permutations
from ktray.config import load_config
from ktray.data.shards import image_ids
from ktray.data.subsets import is_held_out
from ktray.methods import jigsaw
from ktray.models.heads import build_jigsaw
from ktray.models.trunks import load_trunk
from ktray.stages import pretext
from ktray.training import checkpoint_name

REPO = Path(__file__).resolve().parents[1]


def test_heldout_slice_is_stable_disjoint_and_sized() -> None:
    ids = [f"train/n{c:03d}/img_{i}.JPEG" for c in range(10) for i in range(300)]
    mask = is_held_out(ids, 0.1, seed=0)
    assert np.array_equal(mask, is_held_out(ids, 0.1, seed=0))
    assert abs(mask.mean() - 0.1) < 5 * np.sqrt(0.1 * 0.9 / len(ids))
    table = pa.table({"image_id": ids, "x": list(range(len(ids)))})
    held = jigsaw._select(table, fraction=0.1, seed=0, heldout=True)
    train = jigsaw._select(table, fraction=0.1, seed=0, heldout=False)
    assert held.num_rows + train.num_rows == len(ids)
    assert not set(held["image_id"].to_pylist()) & set(train["image_id"].to_pylist())


def test_val_puzzles_are_fixed_and_train_puzzles_fresh(ray_session: None, sample_shards: str, run_root: str) -> None:
    cfg = load_config(None, [*pretext_overrides(run_root), "data.limit=120", "pretext.val_puzzles=50"])
    perms = generate_permutations(10, 3)
    ds = jigsaw.build_datasets(cfg, perms, num_workers=2)
    val_a = ds["val"].take_batch(1000)
    val_b = ds["val"].take_batch(1000)
    assert len(val_a["label"]) == 50  # 50 is a multiple of the 2 workers: nothing trimmed
    assert np.array_equal(val_a["tiles"], val_b["tiles"]) and np.array_equal(val_a["label"], val_b["label"])
    assert val_a["tiles"].shape[1:] == (9, 3, 16, 16)
    train_a = ds["train"].take_batch(16)
    train_b = ds["train"].take_batch(16)
    assert not np.array_equal(train_a["tiles"], train_b["tiles"])
    assert ds["train"].count() == cfg.pretext.puzzles_per_image * (120 - len(set(_heldout_ids(sample_shards, cfg))))


def _heldout_ids(path: str, cfg: object) -> list[str]:
    ids = image_ids(path, "train", 120).to_pylist()
    return [i for i, h in zip(ids, is_held_out(ids, cfg.pretext.val_fraction, cfg.seed)) if h]  # type: ignore[attr-defined]


_DRIVER = """
import json, sys, ray
from ktray.stages import pretext
from ktray.config import load_config
ray.init(address=sys.argv[1], log_to_driver=False)
pretext.run(load_config(None, json.loads(sys.argv[2])))
"""


@pytest.mark.slow
def test_two_workers_learn_and_survive_a_killed_driver_and_a_killed_worker(ray_session: None, run_root: str) -> None:
    import ray
    import torch

    overrides = pretext_overrides(run_root)
    cfg = load_config(None, overrides)
    sd = pretext.output_dir(cfg)
    stage_path = Path(sd.uri)

    # 1. A driver in its own process trains until its second checkpoint lands, then is SIGKILLed.
    log = open(Path(run_root) / "driver.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, ray.get_runtime_context().gcs_address, json.dumps(overrides)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.time() + 600
    try:
        while not (stage_path / checkpoint_name(2) / "meta.json").exists():
            assert proc.poll() is None, f"driver exited early:\n{(Path(run_root) / 'driver.log').read_text()[-3000:]}"
            assert time.time() < deadline, "no second checkpoint within 600 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not sd.done(), "the run finished before it could be killed; the test would prove nothing"
    assert (stage_path / "permutations.npy").exists()
    # What the killed run left behind: the history inside each surviving checkpoint.
    left = {
        int(p.name.rsplit("_", 1)[1]): json.loads((p / "meta.json").read_text())["history"]
        for p in stage_path.glob("checkpoint_epoch_*")
        if (p / "meta.json").exists()
    }
    assert left, "no checkpoint survived"

    # 2. Running the same stage again resumes from the last checkpoint. The second fault: one Ray
    #    Train worker is SIGKILLed a moment after the resumed run registers its first new checkpoint;
    #    FailureConfig restarts the worker group from that checkpoint, and the run finishes.
    newer = max(left) + 1
    with Killer("RayTrainWorker", ready=lambda: train_checkpoint_registered(sd.uri, newer),
                running=lambda: not sd.done(), delay=1.5) as kill:
        again = pretext.run(cfg)
    assert kill.pids and kill.stage_running, kill.error or "the worker kill landed after the stage finished"
    assert again == sd and sd.done()
    metrics = sd.manifest()["metrics"]
    history, summary = metrics["history"], metrics["summary"]
    assert [h["step"] for h in history] == list(range(1, cfg.pretext.epochs + 1)), "an epoch is missing or twice"
    # Three starts: the killed driver's, the rerun's (from a checkpoint it left), the restarted group's.
    starts = json.loads((max(stage_path.glob("checkpoint_epoch_*")) / "meta.json").read_text())["starts"]
    assert len(starts) == 3 and starts[0] == 0 and starts[1] in left and starts[2] >= newer, starts
    assert summary["resumed_from_epoch"] == starts[2]
    # The epochs before the resume point are the killed run's, read back from its checkpoint.
    resumed = starts[1]
    before = [{"step": int(h["epoch"]), **{k: v for k, v in h.items() if k != "epoch"}} for h in left[resumed]]
    assert history[:resumed] == before

    # 3. It learned: the loss fell; every epoch reported held-out accuracy and throughput.
    assert history[-1]["loss"] < history[0]["loss"]
    for h in history:
        assert 0 <= h["val_acc"] <= 1 and h["val_n"] == cfg.pretext.val_puzzles and h["puzzles_per_s"] > 0
    assert summary["chance"] == pytest.approx(1 / cfg.pretext.num_permutations)

    # 4. Outputs: the permutation set sizes the classifier; the teacher loads with weights_only.
    perms = jigsaw.load_permutations(sd, cfg.pretext.min_hamming)
    assert perms.shape == (cfg.pretext.num_permutations, 9)
    last_ckpt = max(stage_path.glob("checkpoint_epoch_*"))
    state = torch.load(last_ckpt / "state.pt", weights_only=True)["model"]
    p = cfg.pretext
    net = build_jigsaw(p.arch, p.width, len(perms), tile_dim=p.tile_dim, hidden=p.hidden)
    net.load_state_dict(state)  # strict: the trained classifier has exactly len(perms) outputs
    assert net.head[-1].out_features == len(perms)
    trunk = load_trunk(sd.path("teacher.pt"))
    assert trunk.arch == "resnet18" and trunk.width == 0.25
    torch.testing.assert_close(trunk.state_dict()["stages.conv1.0.weight"], state["trunk.stages.conv1.0.weight"])
    assert {"permutations.npy", "teacher.pt"} <= set(sd.manifest()["files"])

    # 5. A done stage returns at once.
    t0 = time.perf_counter()
    assert pretext.run(cfg) == sd
    assert time.perf_counter() - t0 < 5
