"""ISD: iterative similarity distillation (Tejankar et al. 2020), and the same loss from a frozen teacher.

Where contrastive learning calls every other image a negative, ISD transfers *soft*
similarities. A teacher scores a query against a queue of anchor embeddings; the student is
trained to match that similarity distribution:

    loss = KL( softmax(k . Q^T / T_t)  ||  softmax(q . Q^T / T_s) )      q, k: (B, d), Q: (K, d), unit rows

- ISD pretext (:class:`ISDNet`): the teacher is an exponential moving average of the student
  (``t <- m t + (1 - m) s`` after every step; m = 0.999, 0.99 in the later variant) and sees a
  weakly augmented view while the student sees a strongly augmented one (later variant); the
  student has a prediction MLP on top of the shared projection head; the queue is a FIFO of
  the teacher's keys (128k in the paper).
- Similarity distillation (:class:`DistillNet`, CompRess-1q): the teacher is frozen and
  already trained (any trunk); its embeddings of the data set come from the embed stage's
  Parquet (computed once), and the student, any architecture, maps into the teacher's space
  with an MLP head and matches its similarities over a queue of teacher embeddings.

Across Ray Train workers the queue stays identical: every rank all-gathers the batch's keys
and enqueues the same gathered block (``after_step``); the teacher's batch norm sees the keys
shuffled across workers (MoCo's shuffle BN, against a batch-statistics shortcut). The EMA
teacher, the queue and its pointer are registered parameters/buffers, so the harness's
checkpoint holds them and a resumed run continues exactly.

Everything here is plain torch / numpy; Ray stays in ``ktray.pretext`` and ``ktray.transfer``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ktray.models import Trunk


# --------------------------------------------------------------------------- pure pieces


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m t + (1 - m) s`` for every parameter (same structure); buffers are left alone."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


@torch.no_grad()
def enqueue(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """Write ``keys`` (n, d) into the ring buffer ``queue`` (K, d) at ``ptr``, oldest first out.

    After the call the last ``min(n, K)`` keys are the newest rows and ``ptr`` points at the
    oldest row (where the next write goes). Any n works, also n > K or K not a multiple of n.
    """
    size = queue.shape[0]
    keys = keys.detach().to(queue.dtype)[-size:]  # more keys than slots: only the newest survive
    n = keys.shape[0]
    p = int(ptr)
    idx = (torch.arange(n, device=queue.device) + p) % size
    queue[idx] = keys
    ptr.fill_((p + n) % size)


def newest(queue: Tensor, ptr: Tensor, n: int) -> Tensor:
    """The ``n`` newest rows of the ring, oldest of them first (for tests and inspection)."""
    size = queue.shape[0]
    idx = (torch.arange(n, device=queue.device) + int(ptr) - n) % size
    return queue[idx]


def similarity_logits(q: Tensor, k: Tensor, queue: Tensor, t_student: float, t_teacher: float) -> Tensor:
    """``(B, 2, K)``: student logits ``q.Q/T_s`` and teacher logits ``k.Q/T_t`` in float32.

    Computed outside autocast: at T = 0.01 a bf16 cosine would be off by several logits.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        anchors = queue.detach().float()  # (K, d)
        s = q.float() @ anchors.T / t_student  # (B, K)
        t = k.detach().float() @ anchors.T / t_teacher  # (B, K)
    return torch.stack([s, t], dim=1)


def similarity_kl(out: Tensor, _targets: Tensor | None = None) -> Tensor:
    """KL(teacher || student) over the anchors, averaged over the batch; ``out`` from :func:`similarity_logits`.

    Zero exactly when the two distributions agree; the teacher side carries no gradient.
    """
    log_s = F.log_softmax(out[:, 0], dim=1)  # (B, K)
    log_t = F.log_softmax(out[:, 1].detach(), dim=1)  # (B, K)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def nearest_agreement(out: Tensor, _targets: Tensor | None = None) -> Tensor:
    """How many queries have the same nearest anchor for student and teacher (the runs' ``train_acc``)."""
    return (out[:, 0].argmax(1) == out[:, 1].argmax(1)).sum()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: Tensor) -> Tensor:
    """All workers' ``x`` concatenated in rank order (``x`` itself on one worker); no gradient."""
    import torch.distributed as dist

    _, world = _world()
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def _shared_permutation(n: int, device: torch.device) -> Tensor:
    """A random permutation of ``n``, drawn on rank 0 and broadcast: the same on every worker."""
    import torch.distributed as dist

    perm = torch.randperm(n, device=device)
    dist.broadcast(perm, src=0)
    return perm


def mlp(din: int, hidden: int, dout: int) -> nn.Sequential:
    """The projection / prediction MLP of MoCo v2, BYOL and ISD: fc-bn-relu-fc."""
    from ktray.models import _init

    head = nn.Sequential(nn.Linear(din, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dout))
    _init(head)
    return head


def _features(trunk: Trunk, x: Tensor) -> Tensor:
    """fc7 where the trunk has it (AlexNet / VGG built with fc), else conv5 average-pooled: (B, C)."""
    if trunk.has_fc:
        return trunk.taps(x, ["fc7"])["fc7"]
    return F.adaptive_avg_pool2d(trunk(x), 1).flatten(1)


def _feature_dim(trunk: Trunk) -> int:
    return trunk.out_channels("fc7") if trunk.has_fc else trunk.out_channels("conv5")


class Projected(nn.Module):
    """A trunk and its projection head: images (B, 3, S, S) -> embeddings (B, d), not normalised."""

    def __init__(self, trunk: Trunk, hidden: int, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = mlp(_feature_dim(trunk), hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_features(self.trunk, x))


# --------------------------------------------------------------------------- ISD pretext


class ISDNet(nn.Module):
    """Student (trunk + projection + prediction), EMA teacher (trunk + projection) and the queue.

    ``forward(views (B, 2, 3, S, S))``: view 0 is the student's (strong), view 1 the teacher's;
    returns the ``(B, 2, K)`` logits of :func:`similarity_logits`. ``after_step()`` (called by the
    harness after each optimizer step) moves the teacher and enqueues the step's keys from
    every worker.
    """

    def __init__(
        self,
        arch: str,
        width: float,
        *,
        proj_dim: int = 128,
        proj_hidden: int = 2048,
        queue_size: int = 128000,
        ema: float = 0.999,
        t_teacher: float = 0.02,
        t_student: float = 0.02,
    ) -> None:
        super().__init__()
        from ktray.models import build_trunk

        self.student = Projected(build_trunk(arch, width), proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        self.teacher = copy.deepcopy(self.student)  # starts equal to the student (ISD, MoCo)
        self.teacher.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))  # (K, d)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.ema, self.t_teacher, self.t_student = ema, t_teacher, t_student
        self._pending: Tensor | None = None  # this step's keys from every worker, enqueued after the step

    @property
    def trunk(self) -> Trunk:
        """The student's trunk: what the pretext stage saves as ``teacher.pt``."""
        return self.student.trunk  # type: ignore[return-value]

    def teacher_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unit-norm teacher keys of this worker's views ``(B, d)`` and of every worker's ``(W*B, d)``.

        With several workers the teacher runs on a batch shuffled across them, so its batch norm
        never sees a query's own key among the same statistics (MoCo Sec. 3.3, ISD).
        """
        rank, world = _world()
        with torch.no_grad():
            if world == 1:
                keys = F.normalize(self.teacher(x).float(), dim=1)
                return keys, keys
            b = x.shape[0]
            everyone = gather(x)  # (W*B, 3, S, S)
            perm = _shared_permutation(everyone.shape[0], x.device)
            mine = perm[rank * b:(rank + 1) * b]
            shuffled_keys = F.normalize(self.teacher(everyone[mine]).float(), dim=1)  # (B, d), shuffled order
            all_keys = torch.empty(everyone.shape[0], shuffled_keys.shape[1], device=x.device)
            all_keys[perm] = gather(shuffled_keys)  # back to rank order
            return all_keys[rank * b:(rank + 1) * b], all_keys

    def forward(self, views: Tensor, _targets: Tensor | None = None) -> Tensor:
        q = F.normalize(self.predictor(self.student(views[:, 0])).float(), dim=1)  # (B, d)
        k, everyone = self.teacher_keys(views[:, 1])
        if self.training:
            self._pending = everyone
        return similarity_logits(q, k, self.queue, self.t_student, self.t_teacher)

    def after_step(self) -> None:
        ema_update(self.teacher, self.student, self.ema)
        if self._pending is not None:
            enqueue(self.queue, self.ptr, self._pending)
            self._pending = None


def isd_after_step(model: nn.Module) -> None:
    """The harness's ``after_step`` hook (a module-level function, so the task pickles)."""
    model.after_step()  # type: ignore[operator]


def build_isd(arch: str, width: float, **kwargs: Any) -> ISDNet:
    return ISDNet(arch, width, **kwargs)


# --------------------------------------------------------------------------- similarity distillation


class DistillNet(nn.Module):
    """A student mapped into a frozen teacher's embedding space, and a queue of teacher embeddings.

    ``forward(images (B, 3, S, S), teacher (B, D))``: the teacher's embeddings of the same images
    (read from the embed stage); returns the ``(B, 2, K)`` logits. ``after_step()`` enqueues
    every worker's teacher embeddings of the step.
    """

    def __init__(
        self,
        arch: str,
        width: float,
        dim: int,
        *,
        hidden: int = 2048,
        queue_size: int = 128000,
        t_teacher: float = 0.04,
        t_student: float = 0.04,
    ) -> None:
        super().__init__()
        from ktray.models import build_trunk

        self.student = Projected(build_trunk(arch, width, fc=arch in ("alexnet", "vgg16")), hidden, dim)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.t_teacher, self.t_student = t_teacher, t_student
        self._pending: Tensor | None = None

    @property
    def trunk(self) -> Trunk:
        return self.student.trunk  # type: ignore[return-value]

    def forward(self, x: Tensor, teacher: Tensor) -> Tensor:
        q = F.normalize(self.student(x).float(), dim=1)  # (B, D)
        k = F.normalize(teacher.float(), dim=1)  # (B, D)
        if self.training:
            self._pending = gather(k)
        return similarity_logits(q, k, self.queue, self.t_student, self.t_teacher)

    def after_step(self) -> None:
        if self._pending is not None:
            enqueue(self.queue, self.ptr, self._pending)
            self._pending = None


def build_distill(arch: str, width: float, dim: int, **kwargs: Any) -> DistillNet:
    return DistillNet(arch, width, dim, **kwargs)


# --------------------------------------------------------------------------- augmentations


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
    from ktray import metrics
    from ktray.data import DecodeError, open_rgb

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


def _standardise(pixels: Tensor) -> Tensor:
    """uint8 (N, S, S, 3) -> float (N, 3, S, S), each image at zero mean and unit variance (as embed sees them)."""
    x = pixels.permute(0, 3, 1, 2).float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(1.0)


def views_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 ``views`` (B, 2, S, S, 3) -> float (B, 2, 3, S, S), each view standardised on its own;
    the targets are a dummy (B,): ISD sees no labels."""
    v = batch["views"].to(device, non_blocking=True)
    b = v.shape[0]
    x = _standardise(v.flatten(0, 1))  # (2B, 3, S, S)
    return x.reshape(b, 2, *x.shape[1:]), torch.zeros(b, dtype=torch.long, device=device)


def distill_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """``pixels`` (B, S, S, 3) uint8 -> standardised images; ``teacher`` (B, D) float32 -> the targets."""
    x = _standardise(batch["pixels"].to(device, non_blocking=True))
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["teacher"].to(device, non_blocking=True).float()
