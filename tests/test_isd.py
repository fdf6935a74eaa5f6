"""ISD and similarity distillation: the pure pieces without Ray, then a 2-worker run killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ktray.artifacts import EMA_TEACHER, STUDENT, TEACHER
from ktray.config import DataConfig, load_config, replace
from ktray.data.shards import _keep_rows, data_identity, image_ids, load_table, long_tail_ids
from ktray.data.subsets import long_tail_counts, long_tail_mask
from ktray.methods.isd import two_views, views_batch
from ktray.models.similarity import (
    DistillNet,
    ISDNet,
    ema_update,
    enqueue,
    nearest_agreement,
    similarity_kl,
    similarity_logits,
)
from ktray.models.trunks import load_trunk
from ktray.rundir import StageDir
from ktray.stages import embed, pretext, transfer
from ktray.stages.embed import features_table
from ktray.training import checkpoint_name

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- EMA teacher


def newest(queue: Tensor, ptr: Tensor, n: int) -> Tensor:
    """The ``n`` newest rows of the ring, oldest of them first."""
    size = queue.shape[0]
    idx = (torch.arange(n, device=queue.device) + int(ptr) - n) % size
    return queue[idx]


def test_ema_moves_the_teacher_by_exactly_the_momentum() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, rtol=0, atol=1e-7)
    ema_update(teacher, student, 0.0)  # m = 0: the teacher becomes the student
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(t, s)


def test_isd_step_moves_the_teacher_by_the_configured_momentum_and_only_the_student_learns() -> None:
    torch.manual_seed(0)
    net = ISDNet("resnet18", 0.125, proj_dim=8, proj_hidden=16, queue_size=40, ema=0.99)
    # The teacher starts as a copy of the student and carries no gradient.
    for t, s in zip(net.teacher.parameters(), net.student.parameters(), strict=True):
        assert torch.equal(t, s) and not t.requires_grad
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    views = torch.randn(6, 2, 3, 32, 32)
    loss = similarity_kl(net(views))
    opt.zero_grad()
    loss.backward()
    teacher_before = [p.detach().clone() for p in net.teacher.parameters()]
    opt.step()
    assert all(p.grad is None for p in net.teacher.parameters())
    net.after_step()
    for t, t0, s in zip(net.teacher.parameters(), teacher_before, net.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.99 * t0 + 0.01 * s, rtol=0, atol=1e-6)
    moved = sum(float((t - t0).abs().sum()) for t, t0 in zip(net.teacher.parameters(), teacher_before, strict=True))
    assert moved > 0


# --------------------------------------------------------------------------- queue


def test_queue_keeps_its_length_and_the_newest_keys_whatever_the_batch_size() -> None:
    size, dim = 10, 4
    queue, ptr = torch.zeros(size, dim), torch.zeros((), dtype=torch.long)
    seen: list[torch.Tensor] = []
    for n in (3, 3, 3, 3, 7, 1, 12, 2):  # wraps, a batch larger than the queue, K not a multiple of n
        keys = torch.randn(n, dim)
        enqueue(queue, ptr, keys)
        seen.extend(keys)
        assert queue.shape == (size, dim)
        held = min(len(seen), size)
        torch.testing.assert_close(newest(queue, ptr, held), torch.stack(seen[-held:]))
    # Exactly the newest K keys, no older one.
    assert {tuple(r.tolist()) for r in queue} == {tuple(r.tolist()) for r in seen[-size:]}


def test_isd_step_enqueues_this_steps_keys() -> None:
    torch.manual_seed(0)
    net = ISDNet("resnet18", 0.125, proj_dim=8, proj_hidden=16, queue_size=20)
    views = torch.randn(4, 2, 3, 32, 32)
    net(views)
    keys, _ = net.teacher_keys(views[:, 1])
    net.after_step()
    assert int(net.ptr) == 4
    # The teacher moved in after_step (ema), so compare with the keys of the forward: cosine ~1.
    assert net.queue.shape == (20, 8)
    torch.testing.assert_close(newest(net.queue, net.ptr, 4).norm(dim=1), torch.ones(4))
    assert float((newest(net.queue, net.ptr, 4) * keys).sum(1).min()) > 0.99


# --------------------------------------------------------------------------- loss


def test_loss_is_zero_when_student_and_teacher_agree_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    queue = nn.functional.normalize(torch.randn(64, 16), dim=1)
    q = nn.functional.normalize(torch.randn(8, 16), dim=1)
    same = similarity_logits(q, q, queue, t_student=0.05, t_teacher=0.05)
    assert float(similarity_kl(same)) == pytest.approx(0.0, abs=1e-6)
    assert int(nearest_agreement(same)) == 8
    other = nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert float(similarity_kl(similarity_logits(q, other, queue, 0.05, 0.05))) > 0.01
    # The same embeddings at different temperatures are different distributions.
    assert float(similarity_kl(similarity_logits(q, q, queue, 0.1, 0.01))) > 0.01
    # The gradient reaches the student only.
    qq = q.clone().requires_grad_(True)
    kk = other.clone().requires_grad_(True)
    similarity_kl(similarity_logits(qq, kk, queue, 0.05, 0.05)).backward()
    assert qq.grad is not None and qq.grad.abs().sum() > 0 and kk.grad is None


def test_distill_net_matches_teacher_space_and_queues_teacher_embeddings() -> None:
    torch.manual_seed(0)
    net = DistillNet("alexnet", 0.125, 12, hidden=16, queue_size=16)
    x = torch.randn(4, 3, 64, 64)
    teacher = torch.randn(4, 12)
    out = net(x, teacher)
    assert out.shape == (4, 2, 16)
    similarity_kl(out).backward()
    net.after_step()
    torch.testing.assert_close(newest(net.queue, net.ptr, 4), nn.functional.normalize(teacher, dim=1))


# --------------------------------------------------------------------------- data


def test_two_views_are_uint8_pairs_of_the_asked_size(sample_shards: str) -> None:
    t = load_table(sample_shards, "train", ["image_id", "image"]).slice(0, 5)
    out = two_views({"image": np.array(t["image"].to_pylist(), dtype=object)}, 48, 64, 0.2, "weak")
    assert out["views"].shape == (5, 2, 48, 48, 3) and out["views"].dtype == np.uint8
    x, y = views_batch({"views": torch.as_tensor(out["views"])}, torch.device("cpu"))
    assert x.shape == (5, 2, 3, 48, 48) and y.shape == (5,)
    torch.testing.assert_close(x.mean(dim=(2, 3, 4)), torch.zeros(5, 2), atol=1e-4, rtol=0)


def test_long_tail_subset_is_geometric_deterministic_and_by_label() -> None:
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(labels)
    mask = long_tail_mask(labels, 10.0, seed=3)
    assert np.array_equal(mask, long_tail_mask(labels, 10.0, seed=3))
    assert not np.array_equal(mask, long_tail_mask(labels, 10.0, seed=4))
    counts = np.sort(np.bincount(labels[mask], minlength=10))[::-1]
    assert counts[0] == 100 and counts[-1] == 10  # largest / smallest = the ratio
    expected = np.floor(100 * (10 ** (-1 / 9)) ** np.arange(10) + 1e-9)  # geometric fall-off: n r^i
    assert counts.tolist() == expected.astype(int).tolist()
    assert long_tail_counts(np.array([100, 100]), 1.0, np.array([0, 1])).tolist() == [100, 100]
    with_unlabeled = np.concatenate([labels, [-1, -1]])
    assert not long_tail_mask(with_unlabeled, 10.0, 3)[-2:].any()


def test_long_tail_cuts_only_the_train_split(sample_shards: str) -> None:
    import pyarrow as pa

    cfg = DataConfig(long_tail=5.0, long_tail_seed=1)
    keep = long_tail_ids(cfg)
    train = load_table(sample_shards, "train", ["image_id", "label", "split"])
    assert keep is not None and 0 < len(keep) < train.num_rows
    counts = np.bincount(train.filter(pa.compute.is_in(train["image_id"], value_set=keep))["label"].to_numpy())
    assert counts.max() / counts.min() == pytest.approx(5.0, rel=0.15)
    both = pa.concat_tables([train, load_table(sample_shards, "val", ["image_id", "label", "split"])])
    cut = _keep_rows(both, keep, "train")
    assert cut.num_rows == len(keep) + (both.num_rows - train.num_rows)  # every val row stays
    assert long_tail_ids(DataConfig()) is None
    assert data_identity(cfg) != data_identity(DataConfig())
    assert data_identity(cfg) != data_identity(DataConfig(long_tail=5.0, long_tail_seed=2))
    assert data_identity(DataConfig(long_tail_seed=1)) == data_identity(DataConfig())  # off: the seed is moot
    assert data_identity(DataConfig(long_tail=1.0)) == data_identity(DataConfig())  # 1 means off


def test_stage_folders_separate_methods_and_data_but_keep_old_names(sample_shards: str, run_root: str) -> None:
    cfg = load_config("tiny", [f"root={run_root}"])
    jig = pretext.output_dir(cfg)
    isd_dir = pretext.output_dir(replace(cfg, ["pretext.method=isd"]))
    assert jig != isd_dir
    # A Jigsaw++ teacher's folder ignores the isd section; an ISD one follows it, and long_tail moves both.
    assert pretext.output_dir(replace(cfg, ["isd.queue_size=7"])) == jig
    assert pretext.output_dir(replace(cfg, ["pretext.method=isd", "isd.queue_size=7"])) != isd_dir
    lt = replace(cfg, ["data.long_tail=10"])
    assert pretext.output_dir(lt) != jig and embed.output_dir(lt, jig) != embed.output_dir(cfg, jig)
    # Cluster classification ignores the distill settings; distillation is its own folder.
    labels = StageDir("cluster", "x", f"{run_root}/cluster-x")
    base = transfer.output_dir(cfg, labels)
    assert transfer.output_dir(replace(cfg, ["transfer.distill_queue=9"]), labels) == base
    assert transfer.output_dir(replace(cfg, ["transfer.method=distill"]), labels) != base
    assert transfer.output_dir(lt, labels) != base


# --------------------------------------------------------------------------- Ray: 2 workers, killed, resumed


def _overrides(root: str) -> list[str]:
    return [
        f"root={root}",
        "compute.device=cpu",
        "compute.num_workers=2",
        "compute.cpus_per_worker=0.5",
        "data.limit=192",
        "data.decode_batch_size=32",
        "pretext.method=isd",
        "pretext.arch=resnet18",
        "pretext.width=0.125",
        "isd.image_size=64",
        "isd.view_size=48",
        "isd.proj_dim=32",
        "isd.proj_hidden=64",
        "isd.queue_size=256",
        "isd.ema=0.99",
        "isd.t_teacher=0.01",
        "isd.t_student=0.1",
        "isd.epochs=4",
        "isd.batch_size=32",
        "isd.lr=0.05",
        "isd.lr_step_epochs=10",
    ]


_DRIVER = """
import json, sys, ray
from ktray.stages import pretext
from ktray.config import load_config
ray.init(address=sys.argv[1], log_to_driver=False)
pretext.run(load_config(None, json.loads(sys.argv[2])))
"""


@pytest.mark.slow
def test_isd_two_workers_learn_checkpoint_and_resume_after_sigkill(ray_session: None, run_root: str) -> None:
    import ray

    overrides = _overrides(run_root)
    cfg = load_config(None, overrides)
    sd = pretext.output_dir(cfg)
    stage_path = Path(sd.uri)

    # 1. A driver in its own process trains until its second checkpoint lands, then is SIGKILLed.
    log_path = Path(run_root) / "driver.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, ray.get_runtime_context().gcs_address, json.dumps(overrides)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.time() + 600
    try:
        while not (stage_path / checkpoint_name(2) / "meta.json").exists():
            assert proc.poll() is None, f"driver exited early:\n{log_path.read_text()[-3000:]}"
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
    ckpts = {
        int(p.name.rsplit("_", 1)[1]): p for p in stage_path.glob("checkpoint_epoch_*") if (p / "meta.json").exists()
    }
    assert ckpts, "no checkpoint survived"
    # The checkpoint holds the EMA teacher, the queue and its pointer: a resumed run continues exactly.
    state = torch.load(max(ckpts.items())[1] / "state.pt", weights_only=True)["model"]
    assert state["queue"].shape == (cfg.isd.queue_size, cfg.isd.proj_dim)
    assert "ptr" in state and any(k.startswith("teacher.") for k in state)
    steps = max(ckpts) * ((cfg.data.limit // 2) // (cfg.isd.batch_size // 2))  # per-worker batches per epoch
    assert int(state["ptr"]) == steps * cfg.isd.batch_size % cfg.isd.queue_size  # gathered keys, both workers

    # 2. Running the same stage again resumes from the last checkpoint and finishes.
    again = pretext.run(cfg)
    assert again == sd and sd.done()
    metrics = sd.manifest()["metrics"]
    history, summary = metrics["history"], metrics["summary"]
    resumed = int(summary["resumed_from_epoch"])
    assert resumed >= 1 and resumed in ckpts
    assert [h["step"] for h in history] == list(range(1, cfg.isd.epochs + 1))

    # 3. It learned: the loss fell once the queue held real keys (epoch 1 starts on random anchors).
    assert history[-1]["loss"] < history[1]["loss"]
    assert all(h["images_per_s"] > 0 and 0 <= h["train_acc"] <= 1 for h in history)

    # 4. teacher.pt is a plain trunk file, as a Jigsaw++ teacher's: embed and evaluate load it unchanged.
    trunk = load_trunk(sd.path(TEACHER))
    assert trunk.arch == "resnet18" and trunk.width == 0.125
    assert load_trunk(sd.path(EMA_TEACHER)).arch == "resnet18"


@pytest.mark.slow
def test_distill_student_trains_on_cached_teacher_embeddings(
    ray_session: None, sample_shards: str, run_root: str
) -> None:
    """transfer.method=distill on 2 workers, teacher embeddings read from an embed-style Parquet folder."""
    import pyarrow.parquet as pq

    cfg = load_config(None, [
        f"root={run_root}", "compute.device=cpu", "compute.num_workers=2", "compute.cpus_per_worker=0.5",
        "data.limit=96", "data.decode_batch_size=32", "transfer.method=distill", "transfer.arch=alexnet",
        "transfer.width=0.125", "transfer.image_size=64", "transfer.epochs=2", "transfer.batch_size=32",
        "transfer.lr=0.02", "transfer.distill_queue=64", "transfer.distill_hidden=32",
    ])
    # A stand-in for the embed stage's output: 16-dim "teacher" embeddings keyed by image_id.
    ids = image_ids(sample_shards, "train", 96).to_pylist()
    features = StageDir("embed", "fake", f"{run_root}/embed-fake")
    Path(features.path("features")).mkdir(parents=True)
    x = np.random.default_rng(0).normal(size=(len(ids), 16)).astype(np.float32)
    pq.write_table(features_table(ids, x), features.path("features", "part-0.parquet"))

    sd = transfer.run(cfg, features)
    assert sd.done() and sd == transfer.output_dir(cfg, features)
    m = sd.manifest()["metrics"]
    assert [h["step"] for h in m["history"]] == [1, 2] and m["summary"]["teacher_dim"] == 16
    assert load_trunk(sd.path(STUDENT)).arch == "alexnet"
    state = torch.load(max(Path(sd.uri).glob("checkpoint_epoch_*")) / "state.pt", weights_only=True)["model"]
    # 2 epochs x 3 steps (48 images per worker, 16 per step); each step enqueues both workers' 32 embeddings.
    assert int(state["ptr"]) == (2 * 3 * 32) % 64
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    nearest = (state["queue"].numpy() @ unit.T).max(axis=1)  # (64,) best cosine to a teacher embedding
    assert nearest.min() > 0.9999  # the queue holds teacher embeddings only (the random init is gone)
