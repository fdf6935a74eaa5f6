"""Benchmark: the pretext training step, ktray's Ray Train loop against a bare PyTorch loop.

Both train the same Jigsaw network (``ktray.models.heads.build_jigsaw``, the same seed) with the
same SGD, batch size and thread count on the same puzzles, already in memory: the ratio is
the overhead of ktray's harness (``ktray.training.fit``: a ``TorchTrainer`` worker streaming
batches from a Ray dataset with ``iter_torch_batches``, metrics kept on the device, a
checkpoint per epoch) over ``for x, y in batches: step()``.

Throughput is samples per second over the epochs after the first (the first pays for
start-up and warm-up); the harness times its epochs itself, without checkpointing and
validation, and the bare loop is timed the same way. On GPU both use bf16 autocast and a
``channels_last`` model, as the harness does, and the model FLOP utilisation is the FLOPs of
one step (``torch.utils.flop_counter.FlopCounterMode``, forward + backward) times steps per
second over the GPU's dense bf16 peak (benchmarks/common.py); on CPU it is n/a.

    python benchmarks/pretext_step.py                                     # the tiny preset's teacher
    python benchmarks/pretext_step.py --device cuda --arch vgg16 --width 1 --tile 64 \\
        --permutations 1000 --tile-dim 512 --hidden 4096 --batch-size 256 --steps 50
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import partial

import common
import numpy as np


def build(args):
    from ktray.models.heads import build_jigsaw

    return partial(build_jigsaw, args.arch, args.width, args.permutations, tile_dim=args.tile_dim,
                   hidden=args.hidden)


def make_data(args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = args.steps * args.batch_size
    tiles = rng.standard_normal((n, 9, 3, args.tile, args.tile), dtype=np.float32)  # (N, 9, 3, t, t)
    return tiles, rng.integers(0, args.permutations, n)


def step_flops(args, device: str) -> float:
    """FLOPs of one training step (forward + backward) at the benchmark's batch size."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build(args)().to(device)
    x = torch.randn(args.batch_size, 9, 3, args.tile, args.tile, device=device)
    y = torch.randint(0, args.permutations, (args.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def bare_loop(tiles: np.ndarray, labels: np.ndarray, args, device: str) -> list[tuple[float, float]]:
    """The loop a user writes; returns (samples per wall second, per CPU second) per epoch."""
    import torch
    import torch.nn.functional as F

    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args)().to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x_all, y_all = torch.from_numpy(tiles), torch.from_numpy(labels)
    if cuda:
        x_all, y_all = x_all.pin_memory(), y_all.pin_memory()
    rates = []
    for _ in range(args.epochs):
        model.train()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for s in range(0, len(x_all) - args.batch_size + 1, args.batch_size):
            x = x_all[s : s + args.batch_size].to(device, non_blocking=True)
            y = y_all[s : s + args.batch_size].to(device, non_blocking=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                out = model(x)
                loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        float(loss.detach())  # waits for the last step
        n = len(x_all) // args.batch_size * args.batch_size
        rates.append((n / (time.perf_counter() - t0), n / (time.process_time() - cpu0)))
    return rates


def ktray_loop(tiles: np.ndarray, labels: np.ndarray, args, device: str) -> tuple[list[tuple[float, float]], float]:
    """ktray.training.fit on one worker: (samples per wall s, per CPU s) per epoch (the harness's own
    figures) and the wall time of the whole fit."""
    import pyarrow as pa
    import ray
    import torch.nn.functional as F
    from ray.data.extensions import ArrowTensorArray

    from ktray import training
    from ktray.config import ComputeConfig
    from ktray.methods.jigsaw import jigsaw_batch
    from ktray.rundir import stage_dir

    table = pa.table({"tiles": ArrowTensorArray.from_numpy(tiles), "label": pa.array(labels)})
    ds = ray.data.from_arrow(table)
    task = training.TrainTask(
        build_model=build(args), batch_fn=jigsaw_batch, loss_fn=F.cross_entropy, epochs=args.epochs,
        batch_size=args.batch_size, lr=0.01, momentum=0.9, weight_decay=5e-4, unit="puzzles",
    )
    compute = ComputeConfig(device=device, num_workers=1, cpus_per_worker=float(args.threads), amp=True)
    with tempfile.TemporaryDirectory(prefix="ktray-bench-") as root:
        sd = stage_dir(root, "bench", {"t": time.time()})
        sd.make()
        t0 = time.perf_counter()
        result = training.fit(task, {"train": ds}, compute, sd)
        wall = time.perf_counter() - t0
    return [(h["puzzles_per_s"], h["epoch_s"] * h["puzzles_per_s"] / h["epoch_cpu_s"]) for h in result.history], wall


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--permutations", type=int, default=100)
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--tile-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads = CPUs of the Train worker (0: all)")
    args = p.parse_args()
    device = common.resolve_device(args.device)
    args.threads = args.threads or os.cpu_count() or 1

    import ray
    import torch

    tiles, labels = make_data(args)
    # One logical CPU more than the worker takes, for the Ray Data coordinator feeding it.
    common.init_ray(args.threads + 1, device)
    ktray_rates, ktray_wall = ktray_loop(tiles, labels, args, device)
    ray.shutdown()
    os.nice(5)  # the niceness Ray gave its Train worker: on a shared machine both compete alike
    t0 = time.perf_counter()
    bare_rates = bare_loop(tiles, labels, args, device)
    bare_wall = time.perf_counter() - t0

    def steady(r: list[tuple[float, float]], i: int) -> float:
        return float(np.mean([e[i] for e in (r[1:] if len(r) > 1 else r)]))

    k, b = steady(ktray_rates, 0), steady(bare_rates, 0)
    rows = [common.Row("samples/s", k, b, "wall, after epoch 1"),
            common.Row("samples/CPU-s", steady(ktray_rates, 1), steady(bare_rates, 1), "training process"),
            common.Row("wall, all epochs", ktray_wall, bare_wall, "s", higher_is_better=False)]
    extra: dict = {"ktray_epochs": ktray_rates, "bare_epochs": bare_rates}
    if device == "cuda":
        flops = step_flops(args, device)
        peak = common.peak_flops(torch.cuda.get_device_name(0))
        per_sample = flops / args.batch_size
        extra |= {"flops_per_step": flops, "peak_flops": peak}
        rows.append(common.Row("achieved", k * per_sample / 1e12, b * per_sample / 1e12, "TFLOP/s"))
        if peak:
            rows.append(common.Row("MFU", k * per_sample / peak, b * per_sample / peak, "of bf16 peak"))
    else:
        rows.append(common.Row("MFU", None, None, "GPU only"))
    common.report(
        "pretext_step", f"pretext step: {args.arch} x{args.width:g} Jigsaw ({args.permutations} classes, "
        f"{args.tile} px tiles), batch {args.batch_size}, {args.steps} steps x {args.epochs} epochs, "
        f"{args.threads} thread(s), {device}",
        rows, baseline="bare PyTorch loop", device=device, params=vars(args), extra=extra, out=args.out,
    )


if __name__ == "__main__":
    main()
