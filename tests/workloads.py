"""Small workloads shared by the tests: the pipeline scaled to seconds per stage, learnable labels."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ktray import schema
from ktray.data.shards import load_table
from ktray.data.subsets import limited_rows
from ktray.models.trunks import build_trunk, save_weights
from ktray.rundir import StageDir, stage_dir, write_bytes_atomic, write_manifest

# The tiny preset, smaller still: these runs check mechanics, not accuracy.
FAST_PIPELINE = [
    "data.limit=200",
    "pretext.epochs=2",
    "pretext.val_puzzles=64",
    "pretext.image_size=64",  # 64 px images and 16 px tiles in 20 px cells: seconds per epoch
    "pretext.crop=60",
    "pretext.tile=16",
    "embed.image_size=64",
    "cluster.k=10",
    "cluster.niter=5",
    "transfer.epochs=2",
    "transfer.image_size=64",
    "evaluate.image_size=64",
    "evaluate.taps=[conv3, conv5]",
    "evaluate.probe_c=[0.01]",  # one fit per tap, no search
    "evaluate.fewshot_episodes=50",
]

# Small enough for 2 CPU cores: a quarter-width AlexNet on 64 px crops of 400 images.
TRANSFER_FAST = [
    "data.limit=400",  # the images real_label_clusters labels: 10 classes x 40
    "compute.num_workers=1",
    "compute.cpus_per_worker=1",
    "transfer.width=0.25",
    "transfer.image_size=64",
    "transfer.batch_size=32",
    "transfer.lr=0.005",
    "transfer.weight_decay=0.0005",
    "transfer.holdout_fraction=0.1",
]


def pretext_overrides(root: str) -> list[str]:
    """The pretext stage in about two minutes on 2 cores: 10 permutations, 16 px tiles that fill their
    cells, no foreign tiles or colour tricks (the unit tests cover those). 8 puzzles per image at lr 0.05
    (~130 steps) show learning: loss 2.39 -> 2.09 over 5 epochs. With 4 at lr 0.02 the loss stayed
    within noise of ln 10 and a "loss fell" check passed or failed by chance."""
    return [
        f"root={root}",
        "compute.device=cpu",
        "compute.num_workers=2",
        "compute.cpus_per_worker=0.5",
        "data.limit=240",
        "data.decode_batch_size=32",
        "pretext.arch=resnet18",
        "pretext.width=0.25",
        "pretext.num_permutations=10",
        "pretext.image_size=64",
        "pretext.crop=48",
        "pretext.tile=16",
        "pretext.channel_shift=0",
        "pretext.max_foreign=0",
        "pretext.grey_prob=0",
        "pretext.color_jitter=0",
        "pretext.epochs=5",
        "pretext.lr_step_epochs=10",
        "pretext.batch_size=32",
        "pretext.lr=0.05",
        "pretext.tile_dim=32",
        "pretext.hidden=64",
        "pretext.val_fraction=0.15",
        "pretext.val_puzzles=64",
        "pretext.puzzles_per_image=8",
    ]


def random_teacher(root: str, arch: str = "alexnet", width: float = 0.25, seed: int = 0) -> StageDir:
    """A pretext-stage folder holding a randomly initialised trunk (the paper's 'random' floor)."""
    import torch

    torch.manual_seed(seed)
    sd = stage_dir(root, "pretext", {"random": arch, "width": width, "seed": seed})
    sd.make()
    save_weights(build_trunk(arch, width), sd.path("teacher.pt"))
    write_manifest(sd, config={})
    return sd


def real_label_clusters(run_root: str, sample_shards: str, limit: int = 400) -> StageDir:
    """A cluster stage folder whose pseudo-labels are the real labels: learnable by design.

    It labels the train images ``data.limit=limit`` streams, ``limit / 10`` of each of the
    sample's 10 classes (:func:`ktray.data.subsets.limited_rows`): run the transfer stage on it with
    that limit.
    """
    sub = limited_rows(load_table(sample_shards, "train", ["image_id", "label"]), limit)
    classes = len(np.unique(sub["label"].to_numpy()))
    assert np.bincount(sub["label"].to_numpy()).tolist() == [limit // classes] * classes
    table = pa.table(
        {
            "image_id": sub["image_id"],
            "cluster": sub["label"].cast(pa.int32()),
            "distance": pa.array(np.zeros(sub.num_rows, np.float32)),
        },
        schema=schema.with_metadata(schema.LABELS, k=classes, seed=0, features="real-labels"),
    )
    sd = stage_dir(run_root, "cluster", {"real": classes, "limit": limit})
    sd.make()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(sd.path("labels.parquet"), buf.getvalue())
    write_manifest(sd, config={}, files=["labels.parquet"])
    return sd


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    if mode == "L":
        img = img.convert("L")
    elif mode == "CMYK":
        img = img.convert("CMYK")
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
