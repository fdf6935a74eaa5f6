"""Benchmark: the achieved FLOP/s of each training step against the machine's matmul peaks.

For every model a preset trains (the Jigsaw++ teacher, the student-architecture Jigsaw++ teacher
of `ktray compare`, the student), one optimizer step (forward, backward, SGD) is timed in a bare
loop on data in memory, in three forms:

- ``before``: float32, NCHW: what ktray's harness ran on CPU until the speed work;
- ``channels_last``: float32, NHWC model and inputs (the harness now, on CPUs without AMX);
- ``bf16``: bf16 autocast + channels_last (the harness on GPU and on CPUs with AMX).

FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward); the
peaks are a 4096 x 4096 matmul in float32 and in bf16 on the same threads. The ratio column is
the harness's choice (``channels_last``, or ``bf16`` where ``ktray.runtime.bf16_is_fast``) over
``before``. The Ray pipeline's own rates (data on the same cores) are in each training stage's
manifest; ``--run ROOT`` prints them as FLOP/s too.

    python benchmarks/train_step.py                       # tiny and imagenette-cpu, all cores
    python benchmarks/train_step.py --presets imagenette-cpu --run runs/imagenette-cpu
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import common


def matmul_peak(dtype, seconds: float = 2.0) -> float:
    """FLOP/s of a 4096 x 4096 matmul in ``dtype`` (best of the repeats that fit in ``seconds``)."""
    import torch

    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 4096**3 / (time.perf_counter() - t0))
    return best


def models(preset: str) -> dict[str, tuple[Callable, tuple[int, ...], int, int]]:
    """name -> (build, input shape per sample, classes, batch size) for the models a preset trains."""
    from functools import partial

    from ktray.compare import student_teacher
    from ktray.config import load_config
    from ktray.models.heads import build_jigsaw, build_student

    cfg = load_config(preset)
    out = {}
    for label, c in (("teacher", cfg), ("student-arch teacher", student_teacher(cfg))):
        p = c.pretext
        out[f"{preset} {label}: Jigsaw++ {p.arch} x{p.width:g}, {p.tile} px tiles"] = (
            partial(build_jigsaw, p.arch, p.width, p.num_permutations, tile_dim=p.tile_dim, hidden=p.hidden),
            (9, 3, p.tile, p.tile), p.num_permutations, p.batch_size)
    t = cfg.transfer
    out[f"{preset} student: {t.arch} x{t.width:g}, {t.image_size} px, {cfg.cluster.k} clusters"] = (
        partial(build_student, t.arch, t.width, cfg.cluster.k), (3, t.image_size, t.image_size), cfg.cluster.k,
        t.batch_size)
    return out


def step_rate(
    build: Callable, shape: tuple[int, ...], classes: int, batch: int, form: str, steps: int
) -> tuple[float, float]:
    """(samples/s, FLOPs per sample) of SGD steps on one in-memory batch."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    if form != "before":
        model = model.to(memory_format=torch.channels_last)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    flops = counter.get_total_flops() / batch
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=form == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0), flops


def pipeline_rates(root: str) -> list[tuple[str, float]]:
    """(stage, samples/s of its last epoch) for every finished training stage under ``root``."""
    out = []
    for manifest in sorted(Path(root).glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        rate = next((v for k, v in m.get("metrics", {}).items() if k.endswith("_per_s") and "extract" not in k), None)
        if m["stage"] in ("pretext", "transfer") and rate:
            out.append((manifest.parent.name, float(rate)))
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--presets", default="tiny,imagenette-cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--run", default="", help="a run root: its training stages' rates as FLOP/s too")
    args = p.parse_args()
    import torch

    from ktray.runtime import bf16_is_fast

    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    peaks = {"float32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    harness = "bf16" if bf16_is_fast("cpu") else "channels_last"
    print(f"matmul peaks on {args.threads} thread(s): float32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; the harness runs {harness} here")
    rows, extra = [], {"peaks": peaks, "harness": harness, "models": {}}
    for preset in args.presets.split(","):
        for name, (build, shape, classes, batch) in models(preset).items():
            figs = {form: step_rate(build, shape, classes, batch, form, args.steps)
                    for form in ("before", "channels_last", "bf16")}
            flops = figs["before"][1]
            gf = {form: rate * flops / 1e9 for form, (rate, _) in figs.items()}
            extra["models"][name] = {"flops_per_sample": flops, "samples_per_s": {f: r for f, (r, _) in figs.items()},
                                     "gflops": gf}
            print(f"{name}: {flops / 1e6:.0f} MFLOP/sample; GFLOP/s before {gf['before']:.0f}, "
                  f"channels_last {gf['channels_last']:.0f}, bf16 {gf['bf16']:.0f}", flush=True)
            rows.append(common.Row(f"{name}, GFLOP/s", gf[harness], gf["before"]))
            rows.append(common.Row(f"{name}, % of float32 peak", 100 * gf[harness] * 1e9 / peaks["float32"],
                                   100 * gf["before"] * 1e9 / peaks["float32"]))
    rows.append(common.Row("matmul peak float32 (GFLOP/s)", peaks["float32"] / 1e9, None))
    rows.append(common.Row("matmul peak bf16 (GFLOP/s)", peaks["bf16"] / 1e9, None))
    if args.run:
        for stage, rate in pipeline_rates(args.run):
            print(f"pipeline {stage}: {rate:.1f} samples/s (multiply by the model's FLOPs per sample above)")
            extra.setdefault("pipeline", {})[stage] = rate
    common.report("train_step", f"training step FLOP/s, {args.threads} thread(s), cpu", rows,
                  baseline="before (fp32 NCHW)", device="cpu", params=vars(args), extra=extra, out=args.out)


if __name__ == "__main__":
    main()
