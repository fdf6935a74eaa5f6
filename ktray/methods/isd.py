"""The ISD teacher (Tejankar et al. 2020): iterative similarity distillation, the second pretext method.

A student with a prediction MLP learns to match, over a queue of past teacher embeddings, the
similarity distribution of an EMA teacher: two augmented views per image, no labels, no
held-out puzzles. The student's trunk is saved as ``teacher.pt`` in the same format as a
Jigsaw++ teacher, so embed, cluster, transfer and evaluate take it unchanged
(``ema_teacher.pt`` holds the EMA teacher's trunk beside it). The model, the queue and the
loss live in ``ktray.models.similarity``; this module is the Ray side: views and training.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ktray import metrics
from ktray.artifacts import EMA_TEACHER, TEACHER
from ktray.data.decode import DecodeError, open_rgb
from ktray.data.shards import read_split
from ktray.lifecycle import Output
from ktray.models.similarity import build_isd, nearest_agreement, similarity_kl
from ktray.models.trunks import save_weights, standardise
from ktray.rundir import StageDir
from ktray.training import TrainTask, fit, sgd_schedule

if TYPE_CHECKING:
    import ray.data

    from ktray.config import Config


def params(cfg: Config) -> dict[str, Any]:
    """What an ISD teacher depends on (its folder hash): the method, the trunk and the ``isd``
    section, not the Jigsaw settings it never reads; compute settings are left out."""
    p = cfg.pretext
    return {
        "pretext": {"method": p.method, "arch": p.arch, "width": p.width},
        "isd": cfg.isd.to_dict(),
        "seed": cfg.seed,
        "data": {"train_split": cfg.data.train_split, "limit": cfg.data.limit},
    }


def compute(cfg: Config, sd: StageDir) -> Output:
    """Train the ISD teacher (student + EMA teacher + queue); the student's trunk becomes ``teacher.pt``."""
    p, i = cfg.pretext, cfg.isd
    build = partial(
        build_isd, p.arch, p.width, proj_dim=i.proj_dim, proj_hidden=i.proj_hidden, queue_size=i.queue_size,
        ema=i.ema, t_teacher=i.t_teacher, t_student=i.t_student,
    )
    task = TrainTask(
        build_model=build,
        batch_fn=views_batch,
        loss_fn=similarity_kl,
        acc_fn=nearest_agreement,
        broadcast_buffers=False,  # the queue is kept equal by gathered enqueues, not re-sent every step
        **sgd_schedule(i),
        seed=cfg.seed,
        unit="images",
        extra={"queue_size": i.queue_size},
    )
    print(f"pretext: {p.arch} x{p.width} on ISD (queue {i.queue_size}, EMA {i.ema}, T_t {i.t_teacher}, "
          f"T_s {i.t_student}, teacher view {i.teacher_aug}) -> {sd.uri}", flush=True)
    result = fit(task, build_datasets(cfg), cfg.compute, sd)
    net = build()
    net.load_state_dict(result.state_dict)
    save_weights(net.trunk, sd.path(TEACHER))
    save_weights(net.teacher.trunk, sd.path(EMA_TEACHER))  # type: ignore[arg-type]
    summary = {
        **result.headline("loss", "images_per_s"),
        "agreement": result.summary["train_acc"],  # same nearest anchor for student and teacher
        "queue_size": float(i.queue_size),
    }
    print(f"pretext: done; ISD loss {summary['loss']:.4f}, nearest-anchor agreement {summary['agreement']:.3f}",
          flush=True)
    return Output([TEACHER, EMA_TEACHER], summary, result.history_rows())


def build_datasets(cfg: Config) -> dict[str, ray.data.Dataset]:
    """``train``: the train split, shuffled, two augmented views per image, fresh every epoch."""
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


def strong_augment(size: int, min_scale: float) -> Any:
    """MoCo v2 / ISD's student augmentation: crop, colour jitter, greyscale, blur, flip (PIL in, PIL out)."""
    from torchvision import transforms as T

    kernel = max(3, (size // 10) | 1)  # odd, ~10% of the side (SimCLR)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
    ])


def weak_augment(size: int, min_scale: float) -> Any:
    """The later ISD variant's teacher augmentation: crop and flip only."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip()])


def two_views(
    batch: dict[str, np.ndarray], size: int, image_size: int, min_scale: float, teacher_aug: str = "weak"
) -> dict[str, np.ndarray]:
    """Ray Data task: encoded images -> ``views`` uint8 (B, 2, S, S, 3): [student (strong), teacher].

    Fresh randomness every call (torch's global generator, unseeded per task), so every epoch
    sees new views. Undecodable images are dropped (and counted), as everywhere.
    """

    strong = strong_augment(size, min_scale)
    teacher = strong if teacher_aug == "strong" else weak_augment(size, min_scale)
    out = []
    for data in batch["image"]:
        try:
            img = open_rgb(bytes(data), draft_size=image_size)
        except DecodeError:
            continue
        if min(img.size) > image_size:  # short side to image_size: the crops' scale is relative to it
            scale = image_size / min(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        out.append(np.stack([np.asarray(strong(img), np.uint8), np.asarray(teacher(img), np.uint8)]))
    metrics.record_decode(ok=len(out), failed=len(batch["image"]) - len(out), stage="pretext")
    views = np.stack(out) if out else np.zeros((0, 2, size, size, 3), np.uint8)
    return {"views": views}


def views_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 ``views`` (B, 2, S, S, 3) -> float (B, 2, 3, S, S), each view standardised on its own;
    the targets are a dummy (B,): ISD sees no labels."""
    v = batch["views"].to(device, non_blocking=True)
    b = v.shape[0]
    x = standardise(v.flatten(0, 1))  # (2B, 3, S, S)
    return x.reshape(b, 2, *x.shape[1:]), torch.zeros(b, dtype=torch.long, device=device)
