"""Fault injection for the reliability tests: real processes found in /proc, real SIGKILLs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from local_cluster import ray_workers, session_pids
from workloads import FAST_PIPELINE

from ktray.rundir import read_events


@dataclass
class Kill:
    """What a :class:`Killer` did: which process, when, and whether the stage was still running."""

    pids: list[int] = field(default_factory=list)
    at: float = 0.0
    stage_running: bool = False
    error: str = ""


class Killer(threading.Thread):
    """SIGKILLs one Ray worker process whose title starts with ``ray::<title>``, once ``ready()`` holds.

    It waits for ``ready()`` (a checkpoint on disk, an actor up), then ``delay`` seconds more, so
    the process dies mid-work, then kills the newest matching process below ``root`` (this test's
    own Ray cluster: never another engineer's) and records whether ``running()`` was still true.
    """

    def __init__(self, title: str, ready: Callable[[], bool], running: Callable[[], bool],
                 delay: float = 1.0, root: int | None = None, timeout: float = 600):
        super().__init__(daemon=True)
        self.title, self.ready, self.running = title, ready, running
        self.delay, self.root, self.timeout = delay, root or os.getpid(), timeout
        self.kill = Kill()
        self.stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.time() + self.timeout
        while not self.stop_event.is_set() and time.time() < deadline:
            if self.ready() and ray_workers(self.root, self.title):
                break
            time.sleep(0.1)
        else:
            self.kill.error = f"never ready to kill ray::{self.title}"
            return
        time.sleep(self.delay)
        pids = ray_workers(self.root, self.title)
        if not pids:
            self.kill.error = f"no ray::{self.title} process left to kill"
            return
        self.kill.stage_running = self.running()
        victim = max(pids)  # the newest: a worker, not a long-lived coordinator started first
        os.kill(victim, signal.SIGKILL)
        self.kill.pids.append(victim)
        self.kill.at = time.time()

    def __enter__(self) -> Kill:
        self.start()
        return self.kill

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join(30)


REPO = Path(__file__).resolve().parents[2]


def start_run(root: str, log: Path, *overrides: str) -> subprocess.Popen[bytes]:
    """``ktray run tiny`` (the FAST pipeline) as a user starts it, in its own session, so that a
    SIGKILL of the session takes the driver and the local Ray it started, as a lost node would."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ktray", "run", "tiny", f"root={root}", *FAST_PIPELINE, *overrides],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of ``proc``'s session (the driver, its raylet, GCS and workers)."""
    for _ in range(3):  # a dying raylet may still fork: sweep until the session is empty
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    proc.wait(30)


def wait_for_event(root: str, proc: subprocess.Popen[bytes], stage: str, event: str, count: int,
                   timeout: float = 900) -> bool:
    """Wait until ``events.jsonl`` holds ``count`` ``event`` lines for ``stage``; False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum(e.get("stage") == stage and e.get("event") == event for e in read_events(root)) >= count:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    raise TimeoutError(f"no {event} event for {stage} within {timeout} s")
