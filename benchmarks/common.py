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


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
