"""Shared pieces of the benchmark scripts: arguments, the machine, the table and the JSON.

Every script measures a ktray stage and a plain baseline doing the same work in one process
run, then calls :func:`report` with rows of ``(what, ktray, baseline)`` figures: it prints a
small table with their ratio and writes everything (plus the machine and its load) as JSON
under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (FLOP/s) for the model FLOP utilisation; matched on the
# device name torch reports. H200 has the H100's compute (more, faster memory only).
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,  # g5 workers in cluster.yaml
    "L4": 121e12,
    "T4": 65e12,  # fp16; T4 has no bf16 tensor cores
}


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/<script>.json)")
    return p


def resolve_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine(device: str) -> dict[str, Any]:
    """What the figures were taken on: CPUs, memory, GPU, load average, versions."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "device": device,
        "python": sys.version.split()[0],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU from its name, or None when it is not in the table."""
    for key, flops in PEAK_BF16.items():
        if key in device_name:
            return flops
    return None


@dataclass
class Row:
    """One line of a result table: the same measurement for ktray and for the baseline."""

    what: str
    ktray: float | None
    baseline: float | None
    unit: str = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        """ktray / baseline: above 1 means ktray is faster (or, when lower is better, slower)."""
        if self.ktray is None or not self.baseline:
            return None
        return self.ktray / self.baseline

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "ktray": self.ktray, "baseline": self.baseline, "unit": self.unit,
                "ratio": self.ratio, "higher_is_better": self.higher_is_better}


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-2):
        return f"{x:.4g}"
    return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"


def table(rows: Sequence[Row], baseline_name: str) -> str:
    """A fixed-width table: what, ktray, baseline, ratio (ktray / baseline)."""
    w = max(len(r.what) + len(r.unit) + 3 for r in rows)
    lines = [f"{'':<{w}} {'ktray':>12} {baseline_name:>14} {'ktray/base':>11}"]
    for r in rows:
        label = f"{r.what} ({r.unit})" if r.unit else r.what
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"{label:<{w}} {_fmt(r.ktray):>12} {_fmt(r.baseline):>14} {ratio:>11}")
    return "\n".join(lines)


def report(
    name: str,
    title: str,
    rows: Sequence[Row],
    *,
    baseline: str,
    device: str,
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """Print the table and write the JSON (``benchmarks/results/<name>.json`` by default)."""
    result = {
        "benchmark": name,
        "title": title,
        "baseline": baseline,
        "params": params,
        "rows": [r.to_dict() for r in rows],
        "extra": extra or {},
        "machine": machine(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    m = result["machine"]
    print(f"\n{title}")
    print(f"machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, {m.get('gpu', 'no GPU')}, "
          f"load {' '.join(map(str, m['load_avg']))}; baseline: {baseline}")
    print(table(rows, baseline.split()[0][:14]))
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return result


def descendants(root: int | None = None) -> list[int]:
    """``root`` (default: this process) and every process below it, from /proc parent ids.

    A local ``ray.init`` starts the GCS and the raylet as children of the driver, and every
    Ray worker as a child of the raylet, so the tree holds all of a benchmark's processes.
    """
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system, with reaped children) used so far by a process tree.

    On a machine shared with other jobs wall time measures the neighbours as much as the
    code; CPU seconds per item does not, so every benchmark reports both.
    """
    total = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


class Meter:
    """Wall and CPU seconds of a block: ``with Meter() as m: ...; m.wall, m.cpu``."""

    def __enter__(self) -> Meter:
        self.t0, self.c0 = time.perf_counter(), tree_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = tree_cpu_seconds() - self.c0


def init_ray(num_cpus: int, device: str, **kwargs: Any) -> None:
    """A local Ray for the benchmark (``runtime.init_ray``: retried on a loaded machine), no progress bars."""
    import ray

    from ktray.runtime import init_ray as start

    start(num_cpus=num_cpus, num_gpus=1 if device == "cuda" else 0, include_dashboard=False, log_to_driver=False,
          **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False


def nice_worker(*_: object) -> None:
    """DataLoader ``worker_init_fn``: the niceness Ray gives its workers (+5), so that on a
    shared machine the baseline's workers compete for the CPUs exactly as Ray's do."""
    os.nice(5)


def pass_rows(unit: str, ktray: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> list[Row]:
    """Rows from passes of ``(items, wall s, CPU s)``: the first pass is a warm-up, reported apart."""

    def rates(passes: Sequence[Sequence[float]]) -> tuple[float | None, float | None, float | None]:
        if not passes:
            return None, None, None
        timed = passes[1:] or passes
        n = sum(p[0] for p in timed)
        return n / sum(p[1] for p in timed), n / max(sum(p[2] for p in timed), 1e-9), passes[0][1]

    k, b = rates(ktray), rates(baseline)
    return [
        Row(f"{unit}/s", k[0], b[0], "wall, after warm-up"),
        Row(f"{unit}/CPU-s", k[1], b[1], "all processes"),
        Row("first pass", k[2], b[2], "s", higher_is_better=False),
    ]


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
