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

Everything here is plain torch; Ray stays in ``ktray.methods.isd`` and ``ktray.methods.distill``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ktray.models.heads import FC_ARCHS, Projected, mlp
from ktray.models.trunks import Trunk, build_trunk


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


class QueuedNet(nn.Module):
    """A model with a FIFO queue of unit-norm anchors ``queue`` (K, d) and its pointer ``ptr``.

    The forward stages the step's keys (:meth:`stage`); the harness calls :meth:`after_step`
    after each optimizer step, which enqueues them. Keys are gathered from every worker before
    they are staged, so the queue stays identical across Ray Train workers. Buffers, so the
    checkpoint holds the queue and a resumed run continues exactly.
    """

    queue: Tensor
    ptr: Tensor

    def init_queue(self, size: int, dim: int) -> None:
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))  # (K, d)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._pending: Tensor | None = None  # this step's keys from every worker

    def stage(self, keys: Tensor) -> None:
        if self.training:
            self._pending = keys

    def after_step(self) -> None:
        if self._pending is not None:
            enqueue(self.queue, self.ptr, self._pending)
            self._pending = None


class ISDNet(QueuedNet):
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

        self.student = Projected(build_trunk(arch, width), proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        self.teacher = copy.deepcopy(self.student)  # starts equal to the student (ISD, MoCo)
        self.teacher.requires_grad_(False)
        self.init_queue(queue_size, proj_dim)
        self.ema, self.t_teacher, self.t_student = ema, t_teacher, t_student

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
        self.stage(everyone)
        return similarity_logits(q, k, self.queue, self.t_student, self.t_teacher)

    def after_step(self) -> None:
        ema_update(self.teacher, self.student, self.ema)
        super().after_step()


def build_isd(arch: str, width: float, **kwargs: Any) -> ISDNet:
    return ISDNet(arch, width, **kwargs)


class DistillNet(QueuedNet):
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

        self.student = Projected(build_trunk(arch, width, fc=arch in FC_ARCHS), hidden, dim)
        self.init_queue(queue_size, dim)
        self.t_teacher, self.t_student = t_teacher, t_student

    @property
    def trunk(self) -> Trunk:
        return self.student.trunk  # type: ignore[return-value]

    def forward(self, x: Tensor, teacher: Tensor) -> Tensor:
        q = F.normalize(self.student(x).float(), dim=1)  # (B, D)
        k = F.normalize(teacher.float(), dim=1)  # (B, D)
        self.stage(gather(k))
        return similarity_logits(q, k, self.queue, self.t_student, self.t_teacher)


def build_distill(arch: str, width: float, dim: int, **kwargs: Any) -> DistillNet:
    return DistillNet(arch, width, dim, **kwargs)
