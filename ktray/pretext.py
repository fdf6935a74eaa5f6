"""The pretext stage: train the teacher on Jigsaw++ (Noroozi et al. 2018) or ISD with Ray Train.

``pretext.method: isd`` trains by iterative similarity distillation instead (``ktray.isd``;
settings in the ``isd`` section): two augmented views per image, no held-out puzzles, and
the student's trunk saved as ``teacher.pt`` in the same format, so embed, cluster, transfer
and evaluate take it unchanged (``ema_teacher.pt`` holds the EMA teacher's trunk beside it).

    images (shards) ──► Ray Data: decode + puzzles (CPU) ──► TorchTrainer workers ──► teacher.pt
                        └─ held-out slice ─► fixed val puzzles (materialized once) ─┘

Outputs in the stage folder ``<root>/pretext-<hash>/``:

- ``permutations.npy``: the (N, 9) permutation set; the classifier has ``len(perms)`` outputs,
  and every later stage that needs the set loads it from here (:func:`load_permutations`);
- ``checkpoint_epoch_XXXX/``: Ray Train checkpoints (the last two), from which a rerun resumes;
- ``teacher.pt``: the trained trunk (``{"arch", "width", "state_dict"}``; see ``ktray.models``);
- ``manifest.json``: per-epoch loss, held-out puzzle accuracy, puzzles/s; the chance level.

Held-out puzzles: the train images whose ``crc32(seed:image_id)`` falls in the first
``val_fraction`` of the hash range never feed training; ``val_puzzles`` seeded puzzles are built
from them once per run on the cluster and scored after every epoch (the same puzzles each time).
"""

from __future__ import annotations

import io
import math
import time
import zlib
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ktray.rundir import StageDir, read_bytes, stage_dir, write_bytes_atomic, write_manifest

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data
    import torch
    from torch import Tensor

    from ktray.config import Config

PERMUTATIONS = "permutations.npy"
TEACHER = "teacher.pt"
EMA_TEACHER = "ema_teacher.pt"  # ISD: the EMA teacher's trunk, kept beside the student's (teacher.pt)


def stage_config(cfg: Config) -> dict[str, Any]:
    """What the stage's output depends on (its folder hash). Compute settings are left out:
    a run interrupted on 2 workers resumes fine on 4. An ISD teacher hashes the method, the
    trunk and the ``isd`` section (not the Jigsaw settings it never reads); a Jigsaw++ one
    hashes the ``pretext`` section as it always did."""
    if cfg.pretext.method == "isd":
        p = cfg.pretext
        return {
            "pretext": {"method": p.method, "arch": p.arch, "width": p.width},
            "isd": cfg.isd.to_dict(),
            "seed": cfg.seed,
            "data": {"train_split": cfg.data.train_split, "limit": cfg.data.limit},
        }
    return {
        "pretext": cfg.pretext.to_dict(),
        "seed": cfg.seed,
        "data": {
            "train_split": cfg.data.train_split,
            "limit": cfg.data.limit,
            "decode_batch_size": cfg.data.decode_batch_size,  # the pool foreign tiles come from
        },
    }


def output_dir(cfg: Config) -> StageDir:
    """The pretext StageDir of ``cfg`` (without running anything)."""
    from ktray.data import data_identity

    return stage_dir(cfg.root, "pretext", stage_config(cfg), inputs=[data_identity(cfg.data)])


# --------------------------------------------------------------------------- permutations


def save_permutations(sd: StageDir, perms: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(perms, dtype=np.int64), allow_pickle=False)
    write_bytes_atomic(sd.path(PERMUTATIONS), buf.getvalue())


def load_permutations(sd: StageDir, min_hamming: int = 1) -> np.ndarray:
    """The (N, 9) permutation set saved with a pretext run, validated."""
    from ktray.jigsaw import check_permutations

    perms = np.load(io.BytesIO(read_bytes(sd.path(PERMUTATIONS))), allow_pickle=False)
    return check_permutations(perms, min_hamming)


def _permutations(cfg: Config, sd: StageDir) -> np.ndarray:
    """Load the set of an interrupted run of this stage, or generate and save it."""
    from ktray.jigsaw import generate_permutations

    p = cfg.pretext
    try:
        perms = load_permutations(sd, p.min_hamming)
        if len(perms) == p.num_permutations:
            return perms
    except FileNotFoundError:
        pass
    perms = generate_permutations(p.num_permutations, p.min_hamming, p.permutation_seed)
    save_permutations(sd, perms)
    return perms


# --------------------------------------------------------------------------- datasets


def is_heldout(image_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the ids in the held-out slice (a stable hash, no randomness)."""
    h = np.asarray([zlib.crc32(f"{seed}:{i}".encode()) for i in image_ids], dtype=np.float64)
    return h / 2**32 < fraction


def _select(table: pa.Table, *, fraction: float, seed: int, heldout: bool) -> pa.Table:
    import pyarrow as pa

    mask = is_heldout(table["image_id"].to_pylist(), fraction, seed)
    return table.filter(pa.array(mask if heldout else ~mask))


def build_datasets(cfg: Config, perms: np.ndarray, num_workers: int) -> dict[str, ray.data.Dataset]:
    """``train``: fresh puzzles every epoch (streamed); ``val``: fixed puzzles (materialized)."""
    from ktray.data import read_split, split_blocks
    from ktray.jigsaw import PuzzleSpec, puzzle_batch

    p = cfg.pretext
    spec = PuzzleSpec.from_config(p)
    rows = cfg.data.decode_batch_size
    images = read_split(cfg.data, cfg.data.train_split)
    select = {"fraction": p.val_fraction, "seed": cfg.seed}
    puzzles = {"perms": perms, "spec": spec, "image_size": p.image_size}

    train = images.map_batches(_select, batch_format="pyarrow", fn_kwargs={**select, "heldout": False})
    if p.shuffle_images:
        train = train.random_shuffle()  # unseeded: a new order (and new foreign-tile pairs) per epoch
    train = split_blocks(train, rows).map_batches(  # one block per decode batch: every CPU builds puzzles
        puzzle_batch,
        batch_size=cfg.data.decode_batch_size,
        batch_format="numpy",
        fn_kwargs={**puzzles, "repeats": p.puzzles_per_image},
    )

    held = images.map_batches(_select, batch_format="pyarrow", fn_kwargs={**select, "heldout": True})
    held = held.materialize()
    n_held = held.count()
    if n_held < 2:
        raise ValueError(
            f"only {n_held} held-out image(s) (pretext.val_fraction={p.val_fraction}); "
            "raise pretext.val_fraction or use more data"
        )
    repeats = math.ceil(p.val_puzzles / n_held)
    val = held.map_batches(
        puzzle_batch,
        batch_size=cfg.data.decode_batch_size,
        batch_format="numpy",
        fn_kwargs={**puzzles, "seed": cfg.seed, "repeats": repeats},
    )
    val = val.limit(p.val_puzzles).materialize()
    # Each worker scores an equal share (streaming_split(equal=True) would drop the remainder).
    n_val = val.count()
    if n_val % num_workers:
        val = val.limit(n_val - n_val % num_workers).materialize()
    for ds in (train, val):
        # The workers' streams re-run every epoch; their progress bars would flood the logs,
        # and rank 0 prints one line per epoch instead.
        ds.context.enable_progress_bars = False
    return {"train": train, "val": val}


# --------------------------------------------------------------------------- training


def jigsaw_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(tiles (B, 9, 3, t, t) float32, label (B,) int64)`` on ``device``."""
    return batch["tiles"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)


def build_isd_datasets(cfg: Config) -> dict[str, ray.data.Dataset]:
    """``train``: the train split, shuffled, two augmented views per image, fresh every epoch."""
    from ktray.data import read_split
    from ktray.isd import two_views

    i = cfg.isd
    train = (
        read_split(cfg.data, cfg.data.train_split)
        .random_shuffle()  # unseeded: a new order (and new batch neighbours) every epoch
        .map_batches(
            two_views,
            batch_size=cfg.data.decode_batch_size,
            batch_format="numpy",
            fn_kwargs={"size": i.view_size, "image_size": i.image_size, "min_scale": i.min_scale,
                       "teacher_aug": i.teacher_aug},
        )
    )
    train.context.enable_progress_bars = False
    return {"train": train}


def run_isd(cfg: Config, sd: StageDir, started: float) -> StageDir:
    """Train the ISD teacher (student + EMA teacher + queue); the student's trunk becomes ``teacher.pt``."""
    from ktray import isd, models, training
    from ktray.data import data_identity
    from ktray.pipeline import init_ray

    init_ray()
    p, i = cfg.pretext, cfg.isd
    build = partial(
        isd.build_isd, p.arch, p.width, proj_dim=i.proj_dim, proj_hidden=i.proj_hidden, queue_size=i.queue_size,
        ema=i.ema, t_teacher=i.t_teacher, t_student=i.t_student,
    )
    task = training.TrainTask(
        build_model=build,
        batch_fn=isd.views_batch,
        loss_fn=isd.similarity_kl,
        acc_fn=isd.nearest_agreement,
        after_step=isd.isd_after_step,
        broadcast_buffers=False,  # the queue is kept equal by gathered enqueues, not re-sent every step
        **training.sgd_schedule(i),
        seed=cfg.seed,
        unit="images",
        extra={"queue_size": i.queue_size},
    )
    print(f"pretext: {p.arch} x{p.width} on ISD (queue {i.queue_size}, EMA {i.ema}, T_t {i.t_teacher}, "
          f"T_s {i.t_student}, teacher view {i.teacher_aug}) -> {sd.uri}", flush=True)
    result = training.fit(task, build_isd_datasets(cfg), cfg.compute, sd)
    net = build()
    net.load_state_dict(result.state_dict)
    models.save_weights(net.trunk, sd.path(TEACHER))
    models.save_weights(net.teacher.trunk, sd.path(EMA_TEACHER))  # type: ignore[arg-type]
    last = result.summary
    summary = {
        "loss": last["loss"],
        "agreement": last["train_acc"],  # same nearest anchor for student and teacher
        "images_per_s": last["images_per_s"],
        "queue_size": float(i.queue_size),
        "epochs": float(last["epoch"]),
        "resumed_from_epoch": float(result.starts[-1]),
    }
    history = [{"step": int(h["epoch"]), **{k: v for k, v in h.items() if k != "epoch"}} for h in result.history]
    write_manifest(
        sd,
        config=stage_config(cfg),
        inputs=[data_identity(cfg.data)],
        files=[TEACHER, EMA_TEACHER],
        metrics={"summary": summary, "history": history},
        started=started,
    )
    print(f"pretext: done; ISD loss {summary['loss']:.4f}, nearest-anchor agreement {summary['agreement']:.3f}",
          flush=True)
    return sd


def run(cfg: Config) -> StageDir:
    """Train the teacher (Jigsaw++ or ISD); return its stage folder (at once if already done)."""
    import torch.nn.functional as F

    from ktray import models, training
    from ktray.data import data_identity

    sd = output_dir(cfg)
    if sd.done():
        return sd
    if cfg.pretext.method == "isd":
        sd.make()
        return run_isd(cfg, sd, time.time())
    started = time.time()
    sd.make()
    p = cfg.pretext
    perms = _permutations(cfg, sd)
    from ktray.pipeline import init_ray

    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one
    build = partial(models.build_jigsaw, p.arch, p.width, len(perms), tile_dim=p.tile_dim, hidden=p.hidden)
    task = training.TrainTask(
        build_model=build,
        batch_fn=jigsaw_batch,
        loss_fn=F.cross_entropy,
        **training.sgd_schedule(p),
        seed=cfg.seed,
        unit="puzzles",
        extra={"num_permutations": len(perms)},
    )
    print(
        f"pretext: {p.arch} x{p.width} on Jigsaw++ ({len(perms)} permutations, chance {1 / len(perms):.4f}) "
        f"-> {sd.uri}",
        flush=True,
    )
    datasets = build_datasets(cfg, perms, cfg.compute.num_workers)
    result = training.fit(task, datasets, cfg.compute, sd)

    net = build()
    net.load_state_dict(result.state_dict)
    models.save_weights(net.trunk, sd.path(TEACHER))
    last = result.summary
    summary = {
        "loss": last["loss"],
        "train_acc": last["train_acc"],
        "val_acc": last["val_acc"],
        "val_loss": last["val_loss"],
        "puzzles_per_s": last["puzzles_per_s"],
        "chance": 1.0 / len(perms),
        "num_permutations": float(len(perms)),
        "epochs": float(last["epoch"]),
        "resumed_from_epoch": float(result.starts[-1]),
    }
    history = [{"step": int(h["epoch"]), **{k: v for k, v in h.items() if k != "epoch"}} for h in result.history]
    write_manifest(
        sd,
        config=stage_config(cfg),
        inputs=[data_identity(cfg.data)],
        files=[PERMUTATIONS, TEACHER],
        metrics={"summary": summary, "history": history},
        started=started,
    )
    print(
        f"pretext: done; held-out puzzle accuracy {summary['val_acc']:.3f} (chance {summary['chance']:.4f})",
        flush=True,
    )
    return sd
