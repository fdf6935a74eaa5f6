"""A real Ray cluster for tests: ``ray start --head --block`` in its own session, temp dir and
loopback ports, stopped by killing exactly its own processes.

Never ``ray stop``: it stops every Ray on the machine, including the tests' own in-process
cluster (whose driver then exits) and anything else running here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

RAY_CLI = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is ``sid`` (read from /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class LocalCluster:
    """``ray start --head --block`` in its own session, temp dir and loopback ports."""

    def __init__(
        self,
        tmp: Path,
        token: str | None,
        num_cpus: int = 2,
        resources: dict[str, float] | None = None,
        extra_env: dict[str, str] | None = None,
        autoscaling_config: Callable[[LocalCluster], dict[str, Any]] | None = None,
    ) -> None:
        self.tmp = tmp
        self.token = token
        self.home = tmp / "home"  # no ~/.ray/auth_token of this machine leaks in
        self.home.mkdir(parents=True, exist_ok=True)
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_http, self.agent_grpc,
         self.runtime_env_port, self.metrics_port, self.node_manager_port, self.object_manager_port) = free_ports(9)
        # Short: Ray's AF_UNIX socket paths under the session dir must stay under 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ktray-", dir="/tmp"))
        self.env = self._env(extra_env or {})
        cmd = [
            RAY_CLI, "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_http}",
            f"--dashboard-agent-grpc-port={self.agent_grpc}", f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--metrics-export-port={self.metrics_port}", f"--node-manager-port={self.node_manager_port}",
            f"--object-manager-port={self.object_manager_port}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={num_cpus}", "--num-gpus=0",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if autoscaling_config is not None:
            path = tmp / "autoscaling.yaml"
            path.write_text(yaml.safe_dump(autoscaling_config(self)))
            cmd.append(f"--autoscaling-config={path}")
        self.log = tmp / "ray-start.log"
        with open(self.log, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KTRAY_"))}
        autoscaler_metrics, dashboard_metrics = free_ports(2)  # Ray's defaults (44217, 44227) are machine-wide
        env.update(HOME=str(self.home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                   AUTOSCALER_METRIC_PORT=str(autoscaler_metrics), DASHBOARD_METRIC_PORT=str(dashboard_metrics),
                   # Export every 1 s (default 10 s) to keep the test short. Ray 2.60 evicts a gauge not
                   # re-reported within 2 export intervals, so its node reporter (default every 5 s) must
                   # then report every 1 s too, or Ray's node metrics (CPU, GPU) vanish between reports.
                   RAY_metrics_report_interval_ms="1000", REPORTER_UPDATE_INTERVAL_MS="1000", PYTHONUNBUFFERED="1",
                   # `python` in a job's entrypoint is this interpreter, as on a node with its venv activated
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if self.token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        else:
            env.update(RAY_AUTH_MODE="disabled")
        env.update(extra)
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, token: str | None = "same") -> dict[str, str]:
        """Environment of a client process: this cluster's token (or ``token``, or none)."""
        env = dict(self.env)
        env.pop("RAY_AUTH_TOKEN", None)
        tok = self.token if token == "same" else token
        if tok:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=tok)
        else:
            env.pop("RAY_AUTH_MODE", None)
        return env

    def wait_ready(self, timeout_s: float = 150) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                # 401 counts as up: the dashboard answers, and refuses us without the token.
                if http_status(f"{self.dashboard}/api/version") in (200, 401):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray head not up after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def session_dir(self) -> Path:
        return (self.temp_dir / "session_latest").resolve()

    def stop(self) -> None:
        """SIGTERM the ``ray start --block`` process (it stops its children), then SIGKILL the rest of its session."""
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        deadline = time.monotonic() + 15
        while (pids := session_pids(sid)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        assert not session_pids(sid), f"processes of the test cluster survived: {session_pids(sid)}"
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_http(url: str, timeout: float) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, local artifacts) on a loopback port.

    ``kill()`` takes it away at once (SIGKILL, as a crashed or preempted server); ``start()``
    brings it back on the same port and the same store, as a restarted server would.
    """

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> MlflowServer:
        log = open(self.dir / "server.log", "a")  # noqa: SIM115 - the child holds it; closed with our copy below
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.dir}/mlflow.db",
             "--default-artifact-root", (self.dir / "artifacts").as_uri(), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # No background job runner (seven worker processes, ~2 GB): the tests log runs, they run no jobs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        try:
            wait_http(self.uri + "/health", timeout)
        except TimeoutError:
            self.kill()  # never leave a server behind that no fixture will stop
            raise
        return self

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # the server and its worker processes
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        self.proc = None

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)


def descendant_pids(root: int) -> list[int]:
    """Every live process below ``root`` in the process tree (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def ray_workers(root: int, title: str) -> list[int]:
    """Pids of the Ray worker processes below ``root`` whose process title starts with ``ray::<title>``.

    A Ray worker renames itself after the actor or task it runs (``ray::RayTrainWorker``), so
    the title tells a training worker from a Ray Data actor; ``root`` (the driver that started
    the local cluster, or a ``ray start`` head) keeps the search to one cluster.
    """
    pids = []
    for pid in descendant_pids(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ray::{title}"):
            pids.append(pid)
    return pids


def train_checkpoint_registered(stage_uri: str, epoch: int) -> bool:
    """Whether Ray Train's controller has registered the stage's checkpoint of ``epoch``.

    The checkpoint's folder on disk is not enough: the controller records a reported checkpoint
    in ``checkpoint_manager_snapshot.json`` a moment later, and only a recorded one is handed to
    a restarted worker group (``FailureConfig``) or a rerun (``ray.train.get_checkpoint``). A kill
    in between restarts from the epoch before, which a resume test must not mistake for a bug.
    """
    from ktray.training import checkpoint_name

    try:
        snapshot = json.loads((Path(stage_uri) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    names = {r.get("checkpoint_dir_name") for r in snapshot.get("checkpoint_results", [])}
    return checkpoint_name(epoch) in names
