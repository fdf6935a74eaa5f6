"""ktray's application metrics, exported to Prometheus through Ray's metrics agent.

The stages call small typed helpers; each process (driver, Ray Data worker, Ray Train
worker, k-means actor) lazily creates its own ``ray.util.metrics`` objects on first use,
and every helper is a cheap no-op when Ray is not initialized in the process (unit tests,
``ktray --help``, plain numpy code), so the math stays callable without Ray.

    from ktray import metrics
    metrics.record_decode(ok=62, failed=2, stage="embed")           # in decode_batch
    metrics.record_training("pretext", epoch=3, loss=4.1, acc=0.12, samples_per_s=850.0)
    with metrics.stage_timer("cluster"):                            # in the pipeline driver
        ...
        metrics.record_kmeans(iteration=7, objective=1.2e5, splits=3, sizes=counts)

Names: every metric is declared once in :data:`METRICS` as ``ktray_<what>``; Ray's
exporter prefixes ``ray_`` and counters get ``_total``, so Prometheus (and the dashboards in
``dashboards/``) see ``ray_ktray_images_decoded_total``, ``ray_ktray_train_loss``, ...
Tags: ``stage`` (pipeline stage) and ``run`` (the pipeline run: ``$KTRAY_RUN`` when set,
which ``ktray submit`` sets to the config's ``name`` for every process of the job, else the
Ray job id); Ray adds ``SessionName``, ``NodeAddress`` and ``WorkerId`` itself.

Counters are cumulative (rates come from PromQL ``rate()``). Gauges need care: since Ray
2.5x the metrics agent *evicts* a gauge value that has not been re-reported within two
export intervals (``metrics_report_interval_ms``, 10 s by default), even while the process
that set it is alive (measured on Ray 2.60: a gauge set once vanished from the scrape ~2 s
later with a 1 s interval). A training loss set once per epoch or a k-means objective set
once per iteration would blink in and out of Grafana. So each process keeps the last value
of its gauges and re-sets them from one daemon thread at half the export interval, until
:func:`forget` or until Ray shuts down in that process (as a Prometheus client library
would: a live process exposes the last value of its gauges).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge"]
Value = float | Callable[[], float]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its ktray name, kind, help text and tag keys."""

    name: str
    kind: Kind
    doc: str
    tags: tuple[str, ...] = ("stage", "run")

    @property
    def exported(self) -> str:
        """The name Prometheus sees (Ray's exporter prefixes ``ray_``; counters end in ``_total``)."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        # data (Ray Data map_batches workers)
        MetricSpec("ktray_images_decoded", "counter", "Images decoded from their encoded bytes."),
        MetricSpec("ktray_decode_failures", "counter", "Images whose bytes did not decode (dropped)."),
        MetricSpec("ktray_puzzles_built", "counter", "Jigsaw++ puzzles built (pretext input pipeline)."),
        # training (Ray Train workers: pretext, transfer)
        MetricSpec("ktray_train_loss", "gauge", "Mean loss of the last reported epoch/interval.",
                   ("stage", "run", "split")),
        MetricSpec("ktray_train_accuracy", "gauge", "Top-1 accuracy of the last reported epoch/interval.",
                   ("stage", "run", "split")),
        MetricSpec("ktray_train_samples_per_second", "gauge",
                   "Training throughput of the reporting worker (sum over workers = job throughput)."),
        MetricSpec("ktray_train_epoch", "gauge", "Last epoch reported (0-based)."),
        MetricSpec("ktray_train_samples", "counter", "Training samples consumed."),
        # embed (Ray Data actor pool)
        MetricSpec("ktray_embed_rows", "counter", "Images run through the teacher's trunk (feature rows)."),
        # cluster (k-means driver)
        MetricSpec("ktray_kmeans_objective", "gauge",
                   "k-means objective (sum of squared distances) after the last Lloyd step."),
        MetricSpec("ktray_kmeans_iteration", "gauge", "Last Lloyd iteration completed (0-based)."),
        MetricSpec("ktray_kmeans_empty_clusters", "gauge",
                   "Empty clusters found (and split) in the last Lloyd step."),
        MetricSpec("ktray_kmeans_empty_splits", "counter",
                   "Empty clusters re-seeded by splitting a large one (faiss's rule), in total."),
        MetricSpec("ktray_kmeans_cluster_size", "gauge",
                   "Cluster sizes after the last Lloyd step: stat = min, p10, median, p90, max.",
                   ("stage", "run", "stat")),
        # every stage
        MetricSpec("ktray_rows_written", "counter", "Rows a stage wrote to its output tables."),
        MetricSpec("ktray_stage_running", "gauge", "1 while the stage runs, 0 once it has finished."),
        MetricSpec("ktray_stage_seconds", "gauge", "Wall time of the stage: elapsed while running, total after."),
        MetricSpec("ktray_stage_runs", "counter", "Stage runs finished, by status (ok, failed).",
                   ("stage", "run", "status")),
    )
}

SIZE_STATS = ("min", "p10", "median", "p90", "max")


def enabled() -> bool:
    """True when Ray is initialized in this process (driver or worker).

    Checks ``sys.modules`` first: a process that never imported Ray cannot have it
    initialized, and importing it here would cost a second for nothing.
    """
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class _Registry:
    """This process's metric objects and the gauges it keeps alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, Any] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], Value] = {}
        self._thread: threading.Thread | None = None
        self._run: str | None = None

    def metric(self, name: str) -> Any:
        obj = self._objects.get(name)
        if obj is None:
            from ray.util import metrics as rm

            spec = METRICS[name]
            with self._lock:
                obj = self._objects.get(name)
                if obj is None:
                    cls = rm.Counter if spec.kind == "counter" else rm.Gauge
                    obj = cls(spec.name, spec.doc, tag_keys=spec.tags)
                    self._objects[name] = obj
        return obj

    def default_run(self) -> str:
        run = os.environ.get("KTRAY_RUN")
        if run:
            return run
        if self._run is None:
            import ray

            self._run = f"job-{ray.get_runtime_context().get_job_id()}"
        return self._run

    def tags(self, name: str, tags: dict[str, Any]) -> dict[str, str]:
        spec = METRICS[name]
        out = {k: str(v) for k, v in tags.items() if v is not None}
        if "run" in spec.tags and "run" not in out:
            out["run"] = self.default_run()
        missing = [k for k in spec.tags if k not in out]
        unknown = [k for k in out if k not in spec.tags]
        if missing or unknown:
            raise ValueError(f"{name}: tags {spec.tags} expected; missing {missing}, unknown {unknown}")
        return out

    def set_gauge(self, name: str, value: Value, tags: dict[str, str]) -> None:
        key = (name, tuple(sorted(tags.items())))
        with self._lock:
            self._gauges[key] = value
        self._publish(name, value, tags)
        self._ensure_thread()

    def forget(self, stage: str | None) -> None:
        with self._lock:
            for key in list(self._gauges):
                if stage is None or dict(key[1]).get("stage") == stage:
                    del self._gauges[key]

    def _publish(self, name: str, value: Value, tags: dict[str, str]) -> None:
        v = value() if callable(value) else value
        self.metric(name).set(float(v), tags=tags)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._refresh, name="ktray-metrics", daemon=True)
                self._thread.start()

    def _refresh(self) -> None:
        period = refresh_period()
        while True:
            time.sleep(period)
            if not enabled():
                with self._lock:  # Ray shut down: its metric objects are gone with it
                    self._gauges.clear()
                    self._objects.clear()
                    self._run = None
                return
            with self._lock:
                items = list(self._gauges.items())
            for (name, tags), value in items:
                with contextlib.suppress(Exception):  # a metric must never take a stage down
                    self._publish(name, value, dict(tags))


_REGISTRY: list[_Registry] = []  # one per process, created on first use
_REGISTRY_LOCK = threading.Lock()


def _registry() -> _Registry:
    if not _REGISTRY:
        with _REGISTRY_LOCK:
            if not _REGISTRY:
                _REGISTRY.append(_Registry())
    return _REGISTRY[0]


def refresh_period() -> float:
    """Seconds between gauge re-sets: ``$KTRAY_METRICS_REFRESH_S``, else half Ray's export interval."""
    env = os.environ.get("KTRAY_METRICS_REFRESH_S")
    if env:
        return max(0.1, float(env))
    try:
        import ray

        interval_ms = ray._config.metrics_report_interval_ms()
    except Exception:
        interval_ms = 10_000
    return max(0.5, max(interval_ms, 1000) / 2000)


# --------------------------------------------------------------------------- generic API


class _Counter:
    def __init__(self, name: str) -> None:
        self.name = name

    def inc(self, value: float = 1.0, **tags: Any) -> None:
        """Add ``value`` (ignored when <= 0: Ray's counters reject it)."""
        if value <= 0 or not enabled():
            return
        reg = _registry()
        reg.metric(self.name).inc(float(value), tags=reg.tags(self.name, tags))


class _Gauge:
    def __init__(self, name: str) -> None:
        self.name = name

    def set(self, value: Value, **tags: Any) -> None:
        """Set the gauge (a number, or a function re-evaluated at every refresh)."""
        if not enabled():
            return
        reg = _registry()
        reg.set_gauge(self.name, value, reg.tags(self.name, tags))


def _spec(name: str, kind: Kind) -> str:
    full = name if name.startswith("ktray_") else f"ktray_{name}"
    if full not in METRICS or METRICS[full].kind != kind:
        known = sorted(n for n, s in METRICS.items() if s.kind == kind)
        raise KeyError(f"no {kind} named {name!r}; known: {known}")
    return full


def counter(name: str) -> _Counter:
    """``counter("images_decoded").inc(64, stage="embed")``."""
    return _Counter(_spec(name, "counter"))


def gauge(name: str) -> _Gauge:
    """``gauge("train_loss").set(2.3, stage="pretext", split="train")``."""
    return _Gauge(_spec(name, "gauge"))


def forget(stage: str | None = None) -> None:
    """Stop re-publishing this process's gauges of ``stage`` (all when None)."""
    if _REGISTRY:
        _REGISTRY[0].forget(stage)


# --------------------------------------------------------------------------- typed helpers


def record_decode(ok: int, failed: int, stage: str, run: str | None = None) -> None:
    """Images decoded and images dropped as undecodable, after one ``decode_batch``."""
    counter("images_decoded").inc(ok, stage=stage, run=run)
    counter("decode_failures").inc(failed, stage=stage, run=run)


def record_puzzles(n: int, stage: str = "pretext", run: str | None = None) -> None:
    """Jigsaw++ puzzles built by one batch of the puzzle pipeline."""
    counter("puzzles_built").inc(n, stage=stage, run=run)


def record_training(
    stage: str,
    epoch: int,
    loss: float,
    acc: float | None = None,
    samples_per_s: float | None = None,
    samples: int = 0,
    split: str = "train",
    run: str | None = None,
) -> None:
    """One training report (per epoch, or per logging interval) from a Ray Train worker.

    Call it from every worker with that worker's own numbers (the dashboards sum
    throughput and average loss/accuracy over workers), or from rank 0 with global ones.
    ``split="val"`` reports held-out loss/accuracy on their own series.
    """
    if not enabled():
        return
    gauge("train_loss").set(float(loss), stage=stage, split=split, run=run)
    if acc is not None:
        gauge("train_accuracy").set(float(acc), stage=stage, split=split, run=run)
    if split == "train":
        gauge("train_epoch").set(float(epoch), stage=stage, run=run)
        if samples_per_s is not None:
            gauge("train_samples_per_second").set(float(samples_per_s), stage=stage, run=run)
        counter("train_samples").inc(samples, stage=stage, run=run)


def record_embed(n: int, stage: str = "embed", run: str | None = None) -> None:
    """Feature rows produced by one embedding batch."""
    counter("embed_rows").inc(n, stage=stage, run=run)


def size_stats(sizes: Sequence[int] | Any) -> dict[str, float]:
    """min, p10, median, p90, max of the cluster sizes (numpy percentiles)."""
    import numpy as np

    s = np.asarray(sizes, dtype=np.float64)
    q = np.percentile(s, [0, 10, 50, 90, 100]) if s.size else np.zeros(5)
    return dict(zip(SIZE_STATS, (float(x) for x in q)))


def record_kmeans(
    iteration: int,
    objective: float,
    splits: int = 0,
    sizes: Sequence[int] | Any = None,
    stage: str = "cluster",
    run: str | None = None,
) -> None:
    """One Lloyd step on the k-means driver: objective, empty-cluster splits, size spread."""
    if not enabled():
        return
    gauge("kmeans_iteration").set(float(iteration), stage=stage, run=run)
    gauge("kmeans_objective").set(float(objective), stage=stage, run=run)
    gauge("kmeans_empty_clusters").set(float(splits), stage=stage, run=run)
    counter("kmeans_empty_splits").inc(splits, stage=stage, run=run)
    if sizes is not None:
        for stat, value in size_stats(sizes).items():
            gauge("kmeans_cluster_size").set(value, stage=stage, stat=stat, run=run)


def record_rows(stage: str, n: int, run: str | None = None) -> None:
    """Rows a stage wrote to its output tables (features, labels, results)."""
    counter("rows_written").inc(n, stage=stage, run=run)


@contextmanager
def stage_timer(stage: str, run: str | None = None) -> Iterator[None]:
    """Mark ``stage`` as running for as long as the block runs, then record its duration.

    While running, ``ktray_stage_seconds`` reports the elapsed time (re-evaluated at each
    refresh); afterwards the total, ``ktray_stage_running`` drops to 0 and
    ``ktray_stage_runs_total{status="ok"|"failed"}`` counts the run. The stage's last gauge
    values (final objective, last iteration) stay published while this process lives: a
    stage shorter than one export interval would otherwise never reach Prometheus at all.
    """
    if not enabled():
        yield
        return
    t0 = time.monotonic()
    gauge("stage_running").set(1.0, stage=stage, run=run)
    gauge("stage_seconds").set(lambda: time.monotonic() - t0, stage=stage, run=run)
    status = "failed"
    try:
        yield
        status = "ok"
    finally:
        if enabled():
            gauge("stage_seconds").set(time.monotonic() - t0, stage=stage, run=run)
            gauge("stage_running").set(0.0, stage=stage, run=run)
            counter("stage_runs").inc(1, stage=stage, status=status, run=run)
