"""Benchmark: ``ktray run`` end to end, per stage wall time and peak memory, at N and 2N images.

Runs ``python -m ktray run tiny`` twice in a subprocess, each with a fresh run root and
``data.limit=N`` then ``2N`` (plus overrides that keep it to minutes, as the pipeline tests'
``FAST`` list), and samples the memory of the whole process tree (the driver, Ray's GCS and
raylet, every Ray worker) once a second from ``/proc``: the sum of PSS (proportional set
size: shared pages, such as the object store's, are split between the processes that map
them instead of counted in each). Stage times come from the run root's ``events.jsonl``
(``started`` / ``finished``); a memory sample belongs to the stage running when it was taken.

The stages stream (Ray Data reads, decodes and writes in blocks), so doubling the input
should double the time of the data-bound stages and leave memory flat. The baseline column
is the N run: the ratio is 2N / N.

    python benchmarks/pipeline.py                        # N = 100 images per split
    python benchmarks/pipeline.py --n 400 --extra pretext.epochs=3
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

FAST = [
    "pretext.epochs=2",
    "pretext.val_puzzles=64",
    "cluster.k=10",
    "cluster.niter=5",
    "transfer.epochs=2",
    "evaluate.taps=[conv3, conv5]",
    "evaluate.fewshot_episodes=50",
]
PAGE = os.sysconf("SC_PAGE_SIZE")


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Samples the total PSS of a process tree every ``interval`` seconds: [(time, bytes, processes)]."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = common.descendants(self.pid)
            self.samples.append((time.time(), sum(pss_bytes(p) for p in pids), len(pids)))
            self.stop.wait(self.interval)


def run_pipeline(n: int, extra: list[str], log_dir: Path) -> dict:
    """One ``ktray run`` at ``data.limit=n``: per stage seconds and peak PSS, total wall and peak."""
    root = tempfile.mkdtemp(prefix=f"ktray-bench-pipeline-{n}-")
    cmd = [sys.executable, "-m", "ktray", "run", "tiny", f"root={root}", f"data.limit={n}", *FAST, *extra]
    env = {**os.environ, "PYTHONPATH": str(common.REPO), "TQDM_DISABLE": "1", "RAY_DEDUP_LOGS": "0"}
    log = log_dir / f"pipeline-{n}.log"
    print(f"running {' '.join(cmd[2:])} (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=common.REPO)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"ktray run failed (exit {rc}); see {log}")
    events = [json.loads(line) for line in (Path(root) / "events.jsonl").read_text().splitlines()]
    started = {e["stage"]: e["time"] for e in events if e["event"] == "started"}
    stages = {}
    for e in events:
        if e["event"] != "finished":
            continue
        a, b = started[e["stage"]], e["time"]
        inside = [s[1] for s in sampler.samples if a <= s[0] <= b]
        stages[e["stage"]] = {"seconds": e["seconds"], "peak_pss": max(inside, default=0)}
    return {"n": n, "root": root, "wall_s": wall, "peak_pss": max((s[1] for s in sampler.samples), default=0),
            "max_processes": max((s[2] for s in sampler.samples), default=0), "stages": stages}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--n", type=int, default=100, help="images per split in the small run (data.limit)")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for both runs")
    args = p.parse_args()
    device = common.resolve_device(args.device)
    extra = [f"compute.device={device}", *args.extra]
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    small = run_pipeline(args.n, extra, common.RESULTS)
    big = run_pipeline(2 * args.n, extra, common.RESULTS)

    gib = 2**30
    rows = []
    for stage in small["stages"]:
        s, b = small["stages"][stage], big["stages"].get(stage)
        if b is None:
            continue
        rows.append(common.Row(f"{stage} time", b["seconds"], s["seconds"], "s", higher_is_better=False))
        rows.append(common.Row(f"{stage} peak PSS", b["peak_pss"] / gib, s["peak_pss"] / gib, "GiB",
                               higher_is_better=False))
    rows.append(common.Row("whole run", big["wall_s"], small["wall_s"], "s", higher_is_better=False))
    rows.append(common.Row("whole run peak PSS", big["peak_pss"] / gib, small["peak_pss"] / gib, "GiB",
                           higher_is_better=False))
    # Here the "ktray" column is the 2N run and the "baseline" column the N run.
    common.report(
        "pipeline", f"ktray run tiny at data.limit={2 * args.n} (ktray column) against {args.n} (base column); "
        f"ratio = 2N / N; {device}",
        rows, baseline=f"N={args.n} run", device=device, params=vars(args) | {"overrides": FAST + extra},
        extra={"small": small, "big": big}, out=args.out,
    )


if __name__ == "__main__":
    main()
