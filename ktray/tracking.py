"""MLflow tracking: a parent run per pipeline, a nested run per stage, a run per Tune trial.

Stages do not talk to MLflow while they compute: each one records its per-epoch or
per-iteration metrics in its manifest (``metrics.history``), and the driver replays the
manifest into the stage's MLflow run when the stage ends. So

- training logs once per epoch, from one process (the driver, after rank 0 reported), and
  an epoch replayed after a worker restart cannot be counted twice (steps are unique);
- a tracking server that goes away mid-run does not stop training: logging is retried at
  the end of the pipeline, and whatever could not be logged is named in a warning, while
  the run directory still holds every figure (running the same command again logs it);
- a reused stage (found done) gets a nested run too, tagged ``reused``, so every pipeline
  run shows the complete picture.

The tracking URI comes from ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
store inside the run root (``<root>/mlflow.db``, artifacts in ``<root>/mlartifacts``), so
the quickstart needs no server and ``mlflow ui --backend-store-uri sqlite:///<root>/mlflow.db``
shows the runs.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow.fs as pafs

from ktray.rundir import StageDir, filesystem, read_bytes

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ktray.config import Config

log = logging.getLogger(__name__)

# What a stage's files may add as artifacts: pictures, tables, weights; not the data tables.
ARTIFACT_SUFFIXES = (".png", ".md", ".csv", ".json", ".pt", ".npy", ".yaml")
MAX_ARTIFACT_BYTES = 512 * 2**20


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached."""


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without userinfo, user, password)``: ``http://u:p@host`` -> ``(http://host, u, p)``.

    A URI's userinfo is a secret: only the stripped URI is ever logged, printed or passed on a
    command line; the credentials travel as MLflow's ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``.
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) if password else None


def redact(uri: str) -> str:
    """``uri`` with its userinfo replaced by ``***``: safe to log, print and record."""
    clean, user, password = split_credentials(uri)
    if user is None and password is None:
        return uri
    parts = urlsplit(clean)
    return urlunsplit(parts._replace(netloc=f"***@{parts.netloc}"))


def public_params(cfg: Config) -> dict[str, Any]:
    """The config as flat MLflow params, with every URI's credentials redacted."""
    params = flatten(cfg.to_dict())
    return {k: redact(v) if isinstance(v, str) and "://" in v else v for k, v in params.items()}


def without_credentials(cfg: Config) -> Config:
    """``cfg`` with the userinfo stripped from ``tracking.uri``: what may be recorded, printed or hashed."""
    clean, _, _ = split_credentials(cfg.tracking.uri)
    if clean == cfg.tracking.uri:
        return cfg
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=clean))


def tracking_credentials(cfg: Config) -> dict[str, str]:
    """MLflow's credential env vars for ``cfg``: the userinfo of ``tracking.uri``, else this process's
    ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` (as :func:`check_reachable` reads them)."""
    _, user, password = split_credentials(cfg.tracking.uri)
    user = user or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    env = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    return {k: v for k, v in env.items() if v is not None}


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in cfg.root:
        raise TrackingUnavailable(
            f"root {cfg.root} is not a local path: set tracking.uri (or MLFLOW_TRACKING_URI) to your MLflow server"
        )
    _, root = filesystem(cfg.root)
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnavailable with a clear message if an http(s) server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    clean, user, password = split_credentials(uri)
    user = user or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    request = urllib.request.Request(clean.rstrip("/") + "/health")
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    shown = redact(uri)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status == 200:
                return
            raise TrackingUnavailable(f"MLflow server {shown} answered /health with HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingUnavailable(
                f"MLflow server {shown} refused the credentials (HTTP {exc.code}); put them in tracking.uri "
                "(http://user:password@host) or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise TrackingUnavailable(f"MLflow server {shown} answered /health with HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"MLflow server {shown} is unreachable ({type(reason).__name__}: {reason}); start it, fix "
            "tracking.uri / MLFLOW_TRACKING_URI, or leave both empty to track into the run root"
        ) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


class Tracker:
    """Logs a pipeline into MLflow; every call degrades to a warning when MLflow is down."""

    def __init__(self, cfg: Config):
        # Fail fast instead of MLflow's default of minutes of retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        self.cfg = cfg
        uri = tracking_uri(cfg)
        check_reachable(uri)
        # The credentials go where MLflow's HTTP client reads them; the URI kept (and printed) has none.
        self.uri, user, password = split_credentials(uri)
        if user is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        self.client: MlflowClient = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment()
        self.parent_id: str | None = None
        self.pending: list[tuple[str, Callable[[], None]]] = []

    def _experiment(self) -> str:
        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):
            artifacts = Path(self.uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def _try(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # the tracking server is best effort; the run directory is the record
            log.warning("MLflow: could not %s (%s); will retry at the end", what, exc)
            self.pending.append((what, fn))

    @contextmanager
    def pipeline_run(self, run_name: str, tags: dict[str, str] | None = None) -> Iterator[str | None]:
        """The parent run; yields its id (None when MLflow refused it)."""
        try:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, public_params(self.cfg))
        except Exception as exc:
            log.warning("MLflow: could not start the pipeline run (%s); continuing without tracking", exc)
            self.parent_id = None
        status = "FAILED"
        try:
            yield self.parent_id
            status = "FINISHED"
        finally:
            self.flush()
            if self.parent_id is not None:
                parent_id = self.parent_id
                self._try("close the pipeline run", lambda: self.client.set_terminated(parent_id, status))

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_stage(self, sd: StageDir, *, reused: bool, params: dict[str, Any] | None = None) -> None:
        """A nested run for one finished stage: params, metrics history, summary, artifacts."""
        if self.parent_id is None:
            return
        manifest = sd.manifest()
        parent_id = self.parent_id
        created: list[str] = []

        def log() -> None:
            # A retry after a half-logged attempt starts over, so no step is logged twice.
            while created:
                self.client.delete_run(created.pop())
            run = self.client.create_run(
                self.experiment_id,
                run_name=sd.stage,
                tags={"mlflow.parentRunId": parent_id, "ktray.stage": sd.stage, "ktray.stage_dir": sd.uri,
                      "ktray.reused": str(reused).lower()},
            )
            rid = run.info.run_id
            created.append(rid)
            self._log_params(rid, flatten(params if params is not None else {"config": manifest.get("config", {})}))
            self.log_manifest_metrics(rid, manifest)
            self._log_artifacts(rid, sd, manifest)
            self.client.set_terminated(rid, "FINISHED")

        self._try(f"log stage {sd.name}", log)

    def log_manifest_metrics(self, run_id: str, manifest: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        metrics = manifest.get("metrics", {})
        now = int(time.time() * 1000)
        batch = []
        for row in metrics.get("history", []):
            step = int(row.get("step", 0))
            batch += [Metric(k, float(v), now, step) for k, v in row.items() if k != "step" and _is_number(v)]
        # A summary figure that is also in the history (the last epoch's loss) is already there
        # at its step; logging it again at step 0 would count that epoch twice.
        in_history = {k for row in metrics.get("history", []) for k in row}
        batch += [
            Metric(k, float(v), now, 0)
            for k, v in metrics.get("summary", {}).items()
            if _is_number(v) and k not in in_history
        ]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def _log_artifacts(self, run_id: str, sd: StageDir, manifest: dict[str, Any]) -> None:
        files = artifact_files(sd, ["manifest.json", *manifest.get("files", [])])
        with tempfile.TemporaryDirectory() as tmp:
            for rel in files:
                local = Path(tmp) / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(read_bytes(sd.path(rel)))
                sub = str(Path(rel).parent) if "/" in rel else None
                self.client.log_artifact(run_id, str(local), artifact_path=sub)

    def log_table(self, local_path: str) -> None:
        """Attach a file (the summary table) to the pipeline run."""
        if self.parent_id is not None:
            parent_id = self.parent_id
            self._try(f"log {local_path}", lambda: self.client.log_artifact(parent_id, local_path))

    def flush(self, attempts: int = 3, wait: float = 5.0) -> None:
        """Retry what failed; warn clearly about what still cannot be logged."""
        for attempt in range(attempts):
            if not self.pending:
                return
            # In order; the first failure ends the round: the server is still away, and every
            # further call would only wait out its own retries.
            while self.pending:
                _, fn = self.pending[0]
                try:
                    fn()
                except Exception:
                    break
                self.pending.pop(0)
            if self.pending and attempt + 1 < attempts:
                time.sleep(wait)
        if self.pending:
            log.warning(
                "MLflow at %s stayed unreachable; not logged: %s. Everything is in the run directory; "
                "once the server is back, the same `ktray run` logs it (finished stages are reused, not recomputed).",
                self.uri, ", ".join(what for what, _ in self.pending),
            )


def artifact_files(sd: StageDir, files: list[Any]) -> list[str]:
    """The files of ``sd`` that may be uploaded as artifacts: a known suffix, a bounded size, and
    (local roots) a real path inside the stage folder.

    A manifest lists names, and a name below a shared run root may be a planted link: a file
    that resolves outside its stage folder (a symlink to a credential) is refused, never read.
    """
    out = []
    for rel in files:
        if not isinstance(rel, str) or not rel.endswith(ARTIFACT_SUFFIXES):
            continue
        try:
            uri = sd.path(rel)
        except ValueError:
            log.warning("MLflow: not uploading %r from %s: the name climbs out of the folder", rel, sd.name)
            continue
        fs, path = filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            base = os.path.realpath(filesystem(sd.uri)[1])
            real = os.path.realpath(path)
            if os.path.commonpath([base, real]) != base or not os.path.isfile(real):
                log.warning("MLflow: not uploading %s from %s: it resolves outside the stage folder (%s)",
                            rel, sd.name, real)
                continue
        info = fs.get_file_info(path)
        if info.size is None or info.size > MAX_ARTIFACT_BYTES:
            continue
        out.append(rel)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # drops NaN
