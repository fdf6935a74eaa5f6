"""Submit a ktray job to a Ray cluster through the Jobs API, with its authentication token.

    ktray submit configs/imagenette.yaml cluster.k=500                 # the pipeline
    ktray submit configs/imagenette.yaml --job sweep --follow          # a Tune sweep
    ktray submit tiny --address http://127.0.0.1:8265

The working tree (this repository, minus run outputs, virtual environments and data) is
uploaded as the job's ``working_dir``; Ray puts it first on every worker's ``PYTHONPATH``,
so the job runs the code you have, not the copy the cluster was set up with. The config is
validated here, before anything is uploaded.

Why a token: since Ray 2.52 a cluster started with ``RAY_AUTH_MODE=token`` refuses Jobs API
and dashboard requests without ``Authorization: Bearer <token>`` (401) or with a wrong one
(403). Without it, anyone who reaches port 8265 can run code on the cluster. The token is
sent explicitly from the first of: ``token=``, ``$RAY_AUTH_TOKEN``, the file at
``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` (Ray's own order), so submitting does not
depend on this process's ``RAY_AUTH_MODE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ktray.config import ConfigError, load_config

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# gitignore-style patterns, relative to the working dir. Ray honours .gitignore as well;
# these hold even in a tree whose .gitignore does not list them. Run outputs and data sets
# never travel with the code (the upload is capped by Ray's gRPC message size, ~500 MiB).
EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    "/runs/",
    "/mlruns/",
    "/data/",
    "benchmarks/results/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.pt",
    "*.ckpt",
]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The job could not be submitted (unreachable cluster, refused token, bad job name)."""


def repo_root() -> Path:
    """The checkout this module lives in: what ``working_dir`` uploads by default."""
    return Path(__file__).resolve().parent.parent


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_API_SERVER_ADDRESS``, ``$RAY_ADDRESS``, else the local dashboard.

    A bare ``host:port`` becomes ``http://host:port``.
    """
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    return addr if "://" in addr else f"http://{addr}"


def resolve_token(token: str | None = None) -> str | None:
    """The Ray auth token to send: explicit, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    p = Path(path).expanduser()
    return (p.read_text().strip() or None) if p.is_file() else None


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def config_argument(config_items: Sequence[str], working_dir: Path) -> tuple[str, list[str], Any]:
    """Validate ``CONFIG [key=value ...]`` here and return (``--config`` value, overrides, Config).

    A YAML path must lie inside the uploaded working dir (the job resolves it there); a
    preset name travels as is.
    """
    items = list(config_items)
    preset = items.pop(0) if items and "=" not in items[0] else "tiny"
    cfg = load_config(preset, items)  # ConfigError names the field, before any upload
    path = Path(preset)
    if path.is_file():
        try:
            preset = path.resolve().relative_to(working_dir.resolve()).as_posix()
        except ValueError:
            raise ConfigError(
                f"config {str(path)!r} is outside the uploaded working directory {working_dir}: "
                "move it under the repository (e.g. configs/) or use a preset with key=value overrides"
            ) from None
    return preset, items, cfg


def build_entrypoint(job: str, config: str, overrides: Sequence[str] = ()) -> str:
    """The job's shell command: ``python jobs/<job>.py --config CONFIG key=value ...``."""
    return shlex.join(["python", f"jobs/{job}.py", "--config", config, *overrides])


def runtime_env(working_dir: Path, env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ray runtime environment of a ktray job: the working tree plus environment variables."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's client lets $RAY_ADDRESS override its ``address`` argument; ktray's --address wins."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str | None = None, token: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` that sends the token on every request."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    tok = resolve_token(token)
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    if tok and urlparse(url).scheme == "http" and not _is_loopback(url):
        log.warning(
            "sending the Ray auth token over plain HTTP to %s; tunnel the dashboard port instead "
            "(`ray dashboard cluster.yaml`, then --address http://127.0.0.1:8265)",
            url,
        )
    try:
        with _without_address_env():
            return JobSubmissionClient(url, headers=headers)
    except Exception as exc:
        raise SubmitError(_explain(exc, url, tok)) from exc


def _explain(exc: Exception, url: str, token: str | None) -> str:
    text = str(exc)
    if "401" in text or "Authentication required" in text:
        return (
            f"{url} requires a Ray auth token and none was found: set RAY_AUTH_TOKEN or write the "
            "cluster's token to ~/.ray/auth_token (docs/cluster.md)"
        )
    if "403" in text or "Authentication failed" in text:
        return f"{url} refused the Ray auth token (403): it is not this cluster's token (docs/cluster.md)"
    return f"cannot reach the Ray Jobs API at {url}: {text.splitlines()[0] if text else type(exc).__name__}"


def submit(
    config_items: Sequence[str],
    address: str | None = None,
    job: str = "pipeline",
    *,
    token: str | None = None,
    working_dir: str | Path | None = None,
    env_vars: Mapping[str, str] | None = None,
    entrypoint: str | None = None,
    submission_id: str | None = None,
    entrypoint_resources: Mapping[str, float] | None = None,
    follow: bool = False,
    quiet: bool = False,
) -> str:
    """Submit ``jobs/<job>.py --config ...`` to the cluster; return the submission id.

    ``entrypoint`` replaces the job script (any shell command run in the working dir);
    ``entrypoint_resources`` pins the driver to nodes advertising those resources (the
    driver runs on the head node otherwise). ``KTRAY_RUN`` (the ``run`` tag of ktray's
    metrics) is the submission id. With ``follow``, streams the logs until the job ends and
    raises :class:`SubmitError` unless it succeeded.
    """
    wd = Path(working_dir) if working_dir is not None else repo_root()
    config, overrides, cfg = config_argument(config_items, wd)
    if entrypoint is None:
        if not (wd / "jobs" / f"{job}.py").is_file():
            known = sorted(p.stem for p in (wd / "jobs").glob("*.py"))
            raise SubmitError(f"no job {job!r} in {wd / 'jobs'}; known: {', '.join(known)}")
        entrypoint = build_entrypoint(job, config, overrides)
    sid = submission_id or f"ktray-{job}-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    url = resolve_address(address)
    if "://" not in cfg.root and not _is_loopback(url):
        log.warning(
            "root=%r is a local path: on a multi-node cluster every node writes its own copy; "
            "use root=s3://... or gs://... (or shared storage) for cluster runs",
            cfg.root,
        )
    c = client(url, token)
    env = {"KTRAY_RUN": sid, **(env_vars or {})}
    try:
        job_id = c.submit_job(
            entrypoint=entrypoint,
            submission_id=sid,
            runtime_env=runtime_env(wd, env),
            metadata={"ktray_job": job, "ktray_config": shlex.join(config_items)},
            entrypoint_resources=dict(entrypoint_resources) if entrypoint_resources else None,
        )
    except Exception as exc:
        raise SubmitError(_explain(exc, url, resolve_token(token))) from exc
    if not quiet:
        print(f"submitted {job_id}: {entrypoint}")
        print(f"  status:  ray job status {job_id} --address {url}")
        print(f"  logs:    ray job logs --follow {job_id} --address {url}")
        print(f"  stop:    ray job stop {job_id} --address {url}")
        print(f"  web:     {url}/#/jobs/{job_id}   (metrics: Grafana, dashboards/README.md)")
    if follow:
        status = follow_logs(c, job_id)
        if status != "SUCCEEDED":
            raise SubmitError(f"job {job_id} ended {status}")
    return job_id


def follow_logs(c: Any, job_id: str) -> str:
    """Print the job's logs as they come until it ends; return its final status."""

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return wait(c, job_id)


def wait(c: Any, job_id: str, timeout_s: float = 1e9, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal status (or ``timeout_s`` passes); return the status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(c.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def cli(args: argparse.Namespace) -> None:
    """``ktray submit CONFIG [key=value ...] [--address URL] [--job NAME] [--follow]``."""
    import sys

    try:
        submit(args.items, args.address, job=args.job, follow=args.follow)
    except SubmitError as exc:
        print(f"ktray: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
