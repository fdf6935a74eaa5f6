"""The Jigsaw++ teacher (Noroozi et al. 2018): a trunk learns which permutation shuffled 3x3 tiles.

    images (shards) ──► Ray Data: decode + puzzles (CPU) ──► TorchTrainer workers ──► teacher.pt
                        └─ held-out slice ─► fixed val puzzles (materialized once) ─┘

Writes ``permutations.npy`` (the (N, 9) set; the classifier has ``len(perms)`` outputs) and
``teacher.pt`` (the trunk) into the pretext stage's folder, and Ray Train checkpoints beside
them, from which a rerun resumes.

Held-out puzzles: the train images in the held-out slice (``ktray.data.subsets.is_held_out``
with ``pretext.val_fraction``) never feed training; ``val_puzzles`` seeded puzzles are built
from them once per run on the cluster and scored after every epoch (the same puzzles each time).
"""

from __future__ import annotations

import io
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch.nn.functional as F

from ktray import metrics
from ktray.algos.jigsaw import CELLS, PuzzleSpec, batch_seed, check_permutations, generate_permutations, make_puzzles
from ktray.artifacts import PERMUTATIONS, TEACHER
from ktray.data.decode import decode_batch
from ktray.data.shards import read_split, split_blocks
from ktray.data.subsets import is_held_out
from ktray.lifecycle import Output
from ktray.models.heads import build_jigsaw
from ktray.models.trunks import save_weights
from ktray.rundir import StageDir, read_bytes, write_npy
from ktray.training import TrainTask, fit, sgd_schedule

if TYPE_CHECKING:
    import ray.data
    import torch
    from torch import Tensor

    from ktray.config import Config


def params(cfg: Config) -> dict[str, Any]:
    """What a Jigsaw++ teacher depends on (its folder hash). Compute settings are left out: a run
    interrupted on 2 workers resumes fine on 4."""
    return {
        "pretext": cfg.pretext.to_dict(),
        "seed": cfg.seed,
        "data": {
            "train_split": cfg.data.train_split,
            "limit": cfg.data.limit,
            "decode_batch_size": cfg.data.decode_batch_size,  # the pool foreign tiles come from
        },
    }


def compute(cfg: Config, sd: StageDir) -> Output:
    """Train the teacher on Jigsaw++; ``permutations.npy`` and ``teacher.pt`` in ``sd``."""
    p = cfg.pretext
    perms = _permutations(cfg, sd)
    build = partial(build_jigsaw, p.arch, p.width, len(perms), tile_dim=p.tile_dim, hidden=p.hidden)
    task = TrainTask(
        build_model=build,
        batch_fn=jigsaw_batch,
        loss_fn=F.cross_entropy,
        **sgd_schedule(p),
        seed=cfg.seed,
        unit="puzzles",
        extra={"num_permutations": len(perms)},
    )
    print(f"pretext: {p.arch} x{p.width} on Jigsaw++ ({len(perms)} permutations, chance {1 / len(perms):.4f}) "
          f"-> {sd.uri}", flush=True)
    result = fit(task, build_datasets(cfg, perms, cfg.compute.num_workers), cfg.compute, sd)
    net = build()
    net.load_state_dict(result.state_dict)
    save_weights(net.trunk, sd.path(TEACHER))
    summary = {
        **result.headline("loss", "train_acc", "val_acc", "val_loss", "puzzles_per_s"),
        "chance": 1.0 / len(perms),
        "num_permutations": float(len(perms)),
    }
    print(f"pretext: done; held-out puzzle accuracy {summary['val_acc']:.3f} (chance {summary['chance']:.4f})",
          flush=True)
    return Output([PERMUTATIONS, TEACHER], summary, result.history_rows())


def save_permutations(sd: StageDir, perms: np.ndarray) -> None:
    write_npy(sd.path(PERMUTATIONS), np.asarray(perms, dtype=np.int64))


def load_permutations(sd: StageDir, min_hamming: int = 1) -> np.ndarray:
    """The (N, 9) permutation set saved with a pretext run, validated."""

    perms = np.load(io.BytesIO(read_bytes(sd.path(PERMUTATIONS))), allow_pickle=False)
    return check_permutations(perms, min_hamming)


def _permutations(cfg: Config, sd: StageDir) -> np.ndarray:
    """Load the set of an interrupted run of this stage, or generate and save it."""

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


def _select(table: pa.Table, *, fraction: float, seed: int, heldout: bool) -> pa.Table:
    mask = is_held_out(table["image_id"].to_pylist(), fraction, seed)
    return table.filter(pa.array(mask if heldout else ~mask))


def build_datasets(cfg: Config, perms: np.ndarray, num_workers: int) -> dict[str, ray.data.Dataset]:
    """``train``: fresh puzzles every epoch (streamed); ``val``: fixed puzzles (materialized)."""

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


def jigsaw_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(tiles (B, 9, 3, t, t) float32, label (B,) int64)`` on ``device``."""
    return batch["tiles"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)


def puzzle_batch(
    batch: dict[str, Any],
    *,
    perms: np.ndarray,
    spec: PuzzleSpec,
    image_size: int,
    seed: int | None = None,
    repeats: int = 1,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: image rows -> ``tiles`` and ``label`` columns.

    Decodes (resize the short side to ``image_size``, center square), then builds puzzles
    with :func:`make_puzzles`; foreign tiles come from other rows of the same batch.
    ``seed=None`` draws fresh entropy (training: new puzzles every epoch); an int makes the
    puzzles a function of the seed and the batch's image ids (the fixed held-out puzzles).
    ``repeats`` builds that many independent puzzles per image (each round draws its foreign
    tiles from the other images of the batch, never from a copy of the same image).
    """

    decoded = decode_batch(batch, size=image_size, mode="center", stage="pretext")
    rng = np.random.default_rng(None if seed is None else batch_seed(seed, decoded["image_id"]))
    if len(decoded["pixels"]) == 0:
        t = spec.tile
        return {"tiles": np.zeros((0, CELLS, 3, t, t), np.float32), "label": np.zeros(0, np.int64)}
    rounds = [make_puzzles(decoded["pixels"], perms, rng, spec) for _ in range(repeats)]
    metrics.record_puzzles(sum(len(r["label"]) for r in rounds))
    return {
        "tiles": np.concatenate([r["tiles"] for r in rounds]),
        "label": np.concatenate([r["label"] for r in rounds]),
    }
