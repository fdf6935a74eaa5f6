"""A generic Ray Train (V2) harness shared by the training stages (pretext and transfer).

What to train is a :class:`TrainTask`: a model builder, a function from a batch to
``(inputs, targets)``, a loss and the SGD schedule; all of it picklable (module-level
functions or ``functools.partial``), because it travels to the workers as their only config.
:func:`fit` runs it on a ``TorchTrainer``:

- one worker per ``cfg.compute.num_workers`` (gloo on CPU; nccl and one GPU each on GPU);
- batches streamed from ``ray.train.get_dataset_shard("train")`` (Ray Data builds them on CPU);
- SGD with momentum, weight decay, and a x0.1 step every ``lr_step_epochs`` epochs (the paper's
  released Caffe solvers: lr 0.01, x0.1 steps, weight decay 5e-4); a ``channels_last`` model
  (NHWC convolutions: tensor cores on GPU, oneDNN's blocked kernels on CPU, measured 1.33x on 2
  cores) and bf16 autocast where :func:`ktray.runtime.bf16_is_fast` says it pays;
- every epoch: loss and accuracy on the training stream, loss and accuracy on the fixed ``val``
  dataset (every worker scores its shard, the sums are all-reduced), samples per second over all
  workers, and a checkpoint (model, optimizer, schedule, history) reported from rank 0;
- the checkpoints live in ``RunConfig(storage_path, name)`` = the stage's own folder, so running
  the same stage again after a crash finds the run's snapshot there and resumes from
  ``ray.train.get_checkpoint()`` at the next epoch (Train V2's way to resume).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ktray.runtime import bf16_is_fast, resolve_device

if TYPE_CHECKING:
    import ray.data
    import torch
    from torch import Tensor, nn

    from ktray.config import ComputeConfig
    from ktray.rundir import StageDir


STATE_FILE = "state.pt"


META_FILE = "meta.json"


@dataclass(frozen=True)
class TrainTask:
    """Everything the workers need to train one model; sent to them as their config.

    ``build_model()`` returns a fresh ``nn.Module`` (called with the same torch seed on every
    worker). ``batch_fn(batch, device)`` turns a dict of tensors from ``iter_torch_batches`` into
    ``(inputs, targets)`` on ``device``. ``loss_fn(outputs, targets)`` is a scalar loss;
    accuracy is ``argmax(outputs) == targets``. ``batch_size`` counts samples per optimizer step
    over all workers; ``unit`` names a sample in the metrics (``puzzles_per_s``). A model with an
    ``after_step()`` method (an EMA teacher, a queue of anchors) has it called after every
    optimizer step.
    """

    build_model: Callable[[], nn.Module]
    batch_fn: Callable[[dict[str, Tensor], torch.device], tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step_epochs: int = 30
    seed: int = 0
    unit: str = "samples"
    val_batch_size: int = 0  # 0: same per-worker size as training
    shuffle_buffer: int = 0  # iter_torch_batches local shuffle buffer (rows per worker; 0: off)
    extra: dict[str, Any] = field(default_factory=dict)  # stored in the checkpoint's meta
    # Hooks for methods that are not plain classification (ISD, similarity distillation):
    forward_targets: bool = False  # call model(inputs, targets): the targets feed the forward (teacher features)
    acc_fn: Callable[[Tensor, Tensor], Tensor] | None = None  # (outputs, targets) -> correct count; None: argmax
    broadcast_buffers: bool = True  # DDP re-broadcasts buffers every step; False for a large queue buffer


def checkpoint_name(epoch: int) -> str:
    """The folder of the checkpoint taken after ``epoch`` (1-based) inside the stage folder."""
    return f"checkpoint_epoch_{epoch:04d}"


SGD_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_step_epochs")


def sgd_schedule(section: Any) -> dict[str, Any]:
    """The :class:`TrainTask` schedule fields, from a config section that declares them (pretext, isd, transfer)."""
    return {name: getattr(section, name) for name in SGD_FIELDS}


@dataclass(frozen=True)
class TrainResult:
    """What :func:`fit` hands back to the stage: the final weights and the per-epoch history."""

    state_dict: dict[str, Any]
    history: list[dict[str, float]]
    starts: list[int]  # the epoch each (re)start of the run began at: [0] fresh, [0, 2] resumed once
    checkpoint: str  # URI of the last checkpoint

    @property
    def summary(self) -> dict[str, float]:
        return dict(self.history[-1]) if self.history else {}

    def headline(self, *keys: str) -> dict[str, float]:
        """The last epoch's ``keys``, how many epochs ran, and the epoch the last (re)start began at."""
        last = self.summary
        return {**{k: last[k] for k in keys}, "epochs": float(last["epoch"]),
                "resumed_from_epoch": float(self.starts[-1])}

    def history_rows(self) -> list[dict[str, float]]:
        """The per-epoch history as manifest rows: ``step`` is the epoch."""
        return [{"step": int(h["epoch"]), **{k: v for k, v in h.items() if k != "epoch"}} for h in self.history]


def fit(
    task: TrainTask,
    datasets: dict[str, ray.data.Dataset],
    compute: ComputeConfig,
    sd: StageDir,
) -> TrainResult:
    """Train ``task`` on ``datasets`` (``train``; ``val`` optional) with checkpoints in ``sd``.

    Resumes from the last checkpoint of an earlier, interrupted run of the same ``sd``.

    ``trainer.fit()`` runs in a zero-CPU task whose runtime env pins ``RAY_ADDRESS`` to this
    cluster. Train V2's controller starts a detached ``PlacementGroupCleaner`` that looks the
    controller up through the state API with no address; on a host where another Ray cluster
    was started with ``ray start`` (a laptop, a shared CI box) that lookup lands on the other
    cluster, finds no controller, and removes this run's placement group, killing the workers
    mid-epoch. Actors inherit the env of the task that creates them, so the pin reaches it.
    """
    import ray

    pinned = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    runner = ray.remote(num_cpus=0, max_retries=0)(_fit).options(runtime_env=pinned)
    return ray.get(runner.remote(task, datasets, compute, sd, resolve_device(compute.device) == "cuda"))


def _fit(
    task: TrainTask,
    datasets: dict[str, ray.data.Dataset],
    compute: ComputeConfig,
    sd: StageDir,
    gpu: bool,
) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage, name = sd.uri.rsplit("/", 1)
    if name != sd.name:
        raise ValueError(f"stage dir {sd.uri} is not named {sd.name}")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"task": task, "amp": compute.amp,
                           "threads": compute.threads_per_worker or max(1, int(compute.cpus_per_worker)),
                           "has_val": "val" in datasets},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=compute.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": compute.cpus_per_worker, **({"GPU": 1} if gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # A dead worker (SIGKILL, OOM, a reclaimed spot node) restarts the group from the last checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=compute.max_failures),
        ),
        datasets=datasets,
        # Split every dataset (train and val) across workers; val is scored by all-reduce.
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {sd.name} finished without a checkpoint")
    return read_checkpoint(result.checkpoint)


def read_checkpoint(checkpoint: Any) -> TrainResult:
    """Load a harness checkpoint (a ``ray.train.Checkpoint``) on the driver."""
    import torch

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
    return TrainResult(
        state_dict=state["model"], history=meta["history"], starts=meta["starts"], checkpoint=checkpoint.path
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _correct(task: TrainTask, out: Tensor, y: Tensor) -> Tensor:
    """How many samples of the batch count as right (the ``train_acc`` / ``val_acc`` numerator)."""
    return task.acc_fn(out, y) if task.acc_fn is not None else (out.argmax(1) == y).sum()


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    task: TrainTask = config["task"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    amp = bool(config["amp"]) and bf16_is_fast(device.type)
    if not cuda:
        torch.set_num_threads(config["threads"])

    torch.manual_seed(task.seed)  # identical initial weights on every worker
    model = task.build_model().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=task.lr_step_epochs, gamma=0.1)

    history: list[dict[str, float]] = []
    starts: list[int] = []
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
            with open(os.path.join(d, META_FILE)) as f:
                meta = json.load(f)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, starts, start_epoch = meta["history"], meta["starts"], int(meta["epoch"])
    starts.append(start_epoch)
    if world > 1:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, broadcast_buffers=task.broadcast_buffers
        )

    after_step = getattr(_unwrap(model), "after_step", None)
    train_shard = ray.train.get_dataset_shard("train")
    # Train V2 raises KeyError for a dataset that was not passed (ISD and distill have no val set).
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val", True) else None
    per_worker = max(1, task.batch_size // world)
    val_per_worker = task.val_batch_size or per_worker

    def reduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    for epoch in range(start_epoch, task.epochs):
        model.train()
        # loss * n, correct, n; kept on the device so the loop never waits for the GPU.
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for batch in train_shard.iter_torch_batches(
            batch_size=per_worker,
            drop_last=True,  # equal step counts on every worker (DDP) and no batch-norm batch of 1
            local_shuffle_buffer_size=task.shuffle_buffer or None,
            prefetch_batches=2,  # keep the next batches in flight while the GPU works
            pin_memory=cuda,
        ):
            x, y = task.batch_fn(batch, device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)  # the model's layout: no conversion per conv
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x, y) if task.forward_targets else model(x)
                loss = task.loss_fn(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()  # the model's own per-step update (an EMA teacher, a queue)
            n = y.shape[0]
            sums[0] += loss.detach().double() * n
            sums[1] += _correct(task, out.detach(), y)
            sums[2] += n
        local = sums.tolist()  # waits for the last step
        elapsed = time.perf_counter() - t0
        # CPU seconds of this worker's process (every thread: torch's and Ray Data's prefetch):
        # unlike wall time, not inflated by other jobs on a shared machine.
        loss_sum, correct, seen, cpu = reduce([*local, time.process_time() - cpu0])
        schedule.step()
        if seen == 0:
            raise RuntimeError(
                f"epoch {epoch + 1}: no training batches (fewer than {per_worker} samples per worker); "
                "lower the batch size or use more data"
            )
        slowest = reduce([elapsed if i == rank else 0.0 for i in range(world)])
        metrics: dict[str, float] = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            f"{task.unit}_per_s": seen / max(max(slowest), 1e-9),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_s": max(slowest),
            "epoch_cpu_s": cpu,  # summed over workers
        }
        if val_shard is not None:
            metrics.update(_evaluate(model, val_shard, task, device, amp, val_per_worker, reduce))
        history.append(metrics)
        meta = {"epoch": epoch + 1, "history": history, "starts": starts, "extra": task.extra}
        if rank == 0:
            print(
                f"[{task.unit}] epoch {epoch + 1}/{task.epochs} "
                + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"),
                flush=True,
            )
            with tempfile.TemporaryDirectory() as d:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                }
                torch.save(state, os.path.join(d, STATE_FILE))
                with open(os.path.join(d, META_FILE), "w") as f:
                    json.dump(meta, f)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(d),
                    checkpoint_dir_name=checkpoint_name(epoch + 1),
                )
        else:
            ray.train.report(metrics)


def _evaluate(
    model: nn.Module,
    shard: Any,
    task: TrainTask,
    device: torch.device,
    amp: bool,
    batch_size: int,
    reduce: Callable[[list[float]], list[float]],
) -> dict[str, float]:
    """Loss and accuracy on this worker's share of the fixed validation set, summed over workers."""
    import torch

    model.eval()
    sums = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
            x, y = task.batch_fn(batch, device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x, y) if task.forward_targets else model(x)
            out = out.float()
            sums[0] += float(task.loss_fn(out, y)) * y.shape[0]
            sums[1] += float(_correct(task, out, y))
            sums[2] += y.shape[0]
    loss_sum, correct, seen = reduce(sums)
    if seen == 0:
        return {"val_loss": math.nan, "val_acc": math.nan, "val_n": 0.0}
    return {"val_loss": loss_sum / seen, "val_acc": correct / seen, "val_n": seen}
