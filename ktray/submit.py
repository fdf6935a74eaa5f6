"""Submit a ktray job to a Ray cluster through the Jobs API, with its authentication token.

    ktray submit configs/imagenette.yaml cluster.k=500                 # the pipeline
    ktray submit configs/imagenette.yaml --job sweep --follow          # a Tune sweep
    ktray submit tiny --address http://127.0.0.1:8265

The working tree (this repository, minus run outputs, virtual environments, data and
anything that looks like a secret) is uploaded as the job's ``working_dir``; Ray puts it
first on every worker's ``PYTHONPATH``, so the job runs the code you have, not the copy the
cluster was set up with. The config is validated here, before anything is uploaded. What is
sent is decided here, file by file (:func:`upload_plan`), copied to a staging folder, and
summarised (count, size, the largest files) before sending; an upload over
``MAX_UPLOAD_BYTES`` is refused.

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
import fnmatch
import ipaddress
import logging
import os
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from ktray.config import Config, ConfigError, load_config
from ktray.tracking import redact, split_credentials

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

# Secrets never leave the machine, wherever they lie in the tree (gitignore-style patterns).
SECRET_EXCLUDES = [
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".pypirc",
    ".git-credentials",
    ".npmrc",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.kdbx",
    "*credentials*.json",
    "*service-account*.json",
    "*service_account*.json",
    "auth_token",
    ".ray/",
    ".ssh/",
    ".aws/",
    ".gnupg/",
    ".kube/",
    ".docker/",
    "gcloud/",
    "mlflow.db",
    "mlartifacts/",
]

# A folder holding one of these is a pack output or a run root, whatever its name: never uploaded.
DATA_MARKERS = (".pack_plan.json", "events.jsonl", ".locks", "mlflow.db")

# Code and configs are small; an upload above this is a data set or a run root left in the tree.
MAX_UPLOAD_BYTES = 100 * 2**20

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
    """Whether ``url``'s host is this machine: ``localhost`` or a loopback IP address, parsed
    (``127.0.0.1.attacker.example`` is a DNS name, not a loopback address)."""
    host = (urlparse(url).hostname or "").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _matches(rel: PurePosixPath, is_dir: bool, pattern: str) -> bool:
    """gitignore-style match: ``dir/`` only directories, a leading ``/`` or inner ``/`` anchors at the root,
    otherwise the pattern matches the base name at any depth."""
    if pattern.endswith("/"):
        if not is_dir:
            return False
        pattern = pattern[:-1]
    if "/" in pattern:
        return fnmatch.fnmatchcase(rel.as_posix(), pattern.lstrip("/"))
    return fnmatch.fnmatchcase(rel.name, pattern)


def config_excludes(cfg: Config, working_dir: Path) -> list[str]:
    """The run root and the data folders of ``cfg`` when they lie inside ``working_dir``, as anchored patterns."""
    out = []
    base = working_dir.resolve()
    for value in (cfg.root, cfg.data.path, cfg.evaluate.data):
        if not value or "://" in value:
            continue
        try:
            rel = Path(value).expanduser().resolve().relative_to(base)
        except ValueError:
            continue
        out.append("/" if rel == Path(".") else f"/{rel.as_posix()}/")
    return out


def upload_plan(working_dir: Path, excludes: Sequence[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """``(files, links)``: every regular file of ``working_dir`` that travels with a job, as
    ``(relative path, bytes)``, and the symbolic links left behind (never followed).

    Left behind as well: whatever ``excludes`` or the top-level ``.gitignore`` names, and every
    folder holding a :data:`DATA_MARKERS` file (packed shards, run roots under any name)."""
    base = Path(working_dir)
    gitignore = base / ".gitignore"
    patterns = list(excludes)
    if gitignore.is_file():
        patterns += [ln.strip() for ln in gitignore.read_text(errors="replace").splitlines()
                     if ln.strip() and not ln.startswith(("#", "!"))]
    if "/" in patterns:
        return [], []
    files: list[tuple[str, int]] = []
    links: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        here = PurePosixPath(Path(dirpath).relative_to(base).as_posix())
        kept = []
        for d in sorted(dirnames):
            rel = here / d if str(here) != "." else PurePosixPath(d)
            if (Path(dirpath) / d).is_symlink():
                links.append(rel.as_posix())
            elif not any(_matches(rel, True, p) for p in patterns) and not any(
                (Path(dirpath) / d / m).exists() for m in DATA_MARKERS
            ):
                kept.append(d)
        dirnames[:] = kept
        for f in sorted(filenames):
            rel = here / f if str(here) != "." else PurePosixPath(f)
            path = Path(dirpath) / f
            if any(_matches(rel, False, p) for p in patterns):
                continue
            if path.is_symlink():
                links.append(rel.as_posix())
            elif path.is_file():
                files.append((rel.as_posix(), path.stat().st_size))
    return sorted(files), sorted(links)


def describe_upload(files: Sequence[tuple[str, int]], links: Sequence[str] = (), largest: int = 5) -> str:
    """One paragraph saying what a job uploads: the count, the size and the largest files."""
    total = sum(n for _, n in files)
    lines = [f"uploading {len(files)} files, {total / 2**20:.2f} MiB as the job's working_dir"]
    for rel, n in sorted(files, key=lambda f: -f[1])[:largest]:
        lines.append(f"    {n / 2**20:8.2f} MiB  {rel}")
    if links:
        more = ", ..." if len(links) > 5 else ""
        lines.append(f"  not sent: {len(links)} symbolic links ({', '.join(links[:5])}{more})")
    return "\n".join(lines)


def stage_upload(working_dir: Path, files: Sequence[tuple[str, int]], dest: Path) -> None:
    """Copy exactly ``files`` from ``working_dir`` to ``dest``: the folder Ray zips and uploads."""
    for rel, _ in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(working_dir) / rel, target)


def credential_env(overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Overrides with the userinfo stripped from ``tracking.uri``, and the credentials as MLflow's env vars.

    The entrypoint is a command line (shown by ``ray job list``); a password never goes there.
    """
    out, env = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "tracking.uri":
            clean, user, password = split_credentials(value.strip())
            if user is not None:
                env["MLFLOW_TRACKING_USERNAME"] = user
            if password is not None:
                env["MLFLOW_TRACKING_PASSWORD"] = password
            item = f"{key}={clean}"
        out.append(item)
    return out, env


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
    overrides, secret_env = credential_env(overrides)
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
    excludes = [*EXCLUDES, *SECRET_EXCLUDES, *config_excludes(cfg, wd)]
    files, links = upload_plan(wd, excludes)
    total = sum(n for _, n in files)
    if total > MAX_UPLOAD_BYTES:
        raise SubmitError(
            f"the upload would be {total / 2**20:.0f} MiB (limit {MAX_UPLOAD_BYTES / 2**20:.0f} MiB): "
            f"{describe_upload(files, links)}\nmove data and run outputs out of {wd} or into .gitignore"
        )
    if not quiet:
        print(describe_upload(files, links), flush=True)
    c = client(url, token)
    env = {"KTRAY_RUN": sid, **secret_env, **(env_vars or {})}
    shown_items = [f"{k}={redact(v)}" if k == "tracking.uri" else i
                   for i in config_items for k, _, v in [i.partition("=")]]
    try:
        with tempfile.TemporaryDirectory(prefix="ktray-upload-") as staging:
            stage_upload(wd, files, Path(staging))
            job_id = c.submit_job(
                entrypoint=entrypoint,
                submission_id=sid,
                runtime_env=runtime_env(Path(staging), env),
                metadata={"ktray_job": job, "ktray_config": shlex.join(shown_items)},
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
