"""Write the Grafana dashboards in this folder from one description (run after editing it).

    python dashboards/build.py

Each dashboard is plain Grafana JSON (schema 39), importable as is: a Prometheus data-source
variable ``${datasource}``, a ``run`` variable (the ``run`` tag of ktray's metrics, i.e. the
submission id of a ``ktray submit`` job) and a ``SessionName`` variable for Ray's own node
metrics. ``tests/test_ops.py`` checks that the JSON files match this script and runs every
query against a real Prometheus scraping a real Ray cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run=~"$run"'
SESSION = 'SessionName=~"$SessionName"'
RATE = "$__rate_interval"


def variables() -> list[dict[str, Any]]:
    def query_var(name: str, query: str, doc: str, multi: bool) -> dict[str, Any]:
        return {
            "name": name,
            "type": "query",
            "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-query"},
            "description": doc,
            "refresh": 2,  # on time-range change: a new run shows up without reloading
            "includeAll": True,
            "allValue": ".*",
            "multi": multi,
            "sort": 2,
            "current": {},
        }

    return [
        {
            "name": "datasource",
            "type": "datasource",
            "query": "prometheus",
            "description": "The Prometheus that scrapes the Ray cluster (Ray's metrics export port).",
            "current": {},
        },
        query_var("run", "label_values(ray_ktray_stage_running, run)",
                  "ktray run: the submission id of `ktray submit` ($KTRAY_RUN), else the Ray job id.", True),
        query_var("SessionName", f"label_values(ray_ktray_stage_running{{{RUN}}}, SessionName)",
                  "Ray session of the run (filters Ray's own node metrics: GPU, CPU).", False),
    ]


def target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


def panel(
    title: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    kind: str = "timeseries",
    unit: str = "short",
    description: str = "",
    **options: Any,
) -> dict[str, Any]:
    x, y, w, h = grid
    defaults: dict[str, Any] = {"unit": unit}
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 10, "showPoints": "auto"}
    if kind == "state-timeline":
        defaults["mappings"] = [
            {"type": "value", "options": {"0": {"text": "done", "color": "green"},
                                          "1": {"text": "running", "color": "blue"}}}
        ]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
    }


def row(title: str, y: int) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["ktray", "ray"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "links": [{"title": "ktray", "type": "dashboards", "tags": ["ktray"], "asDropdown": True}],
        "panels": panels,
    }


def pipeline() -> dict[str, Any]:
    decoded = f"sum by (stage) (rate(ray_ktray_images_decoded_total{{{RUN}}}[{RATE}]))"
    return dashboard(
        "ktray-pipeline",
        "ktray / Pipeline",
        "Which stage runs, how fast each stage moves rows, and what failed.",
        [
            row("Stages", 0),
            panel("Stage running", [target(f"max by (stage) (ray_ktray_stage_running{{{RUN}}})", "{{stage}}")],
                  (0, 1, 16, 6), kind="state-timeline",
                  description="1 while a stage runs in the pipeline driver, 0 once it finished.",
                  showValue="never", mergeValues=True, rowHeight=0.8),
            panel("Stage wall time", [target(f"max by (stage) (ray_ktray_stage_seconds{{{RUN}}})", "{{stage}}")],
                  (16, 1, 8, 6), kind="bargauge", unit="s",
                  description="Elapsed while running, total once finished.",
                  orientation="horizontal", displayMode="gradient",
                  reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}),
            panel("Stage runs by outcome",
                  [target(f"sum by (stage, status) (ray_ktray_stage_runs_total{{{RUN}}})", "{{stage}} {{status}}")],
                  (0, 7, 8, 5), kind="stat",
                  description="Finished stage runs, ok or failed (a failed stage reruns when the job is resubmitted).",
                  reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}, colorMode="value"),
            panel("Active Ray nodes", [target(f"sum by (NodeType) (autoscaler_active_nodes{{{SESSION}}})",
                                              "{{NodeType}}")],
                  (8, 7, 8, 5), kind="timeseries",
                  description="Nodes by type (the autoscaler's metric): GPU workers come and go with the stages."),
            panel("Decode failures (total)",
                  [target(f"sum(ray_ktray_decode_failures_total{{{RUN}}}) "
                          f"or sum(ray_ktray_images_decoded_total{{{RUN}}}) * 0", "dropped")],
                  (16, 7, 8, 5), kind="stat",
                  description="Images whose bytes did not decode; they are dropped and logged, the stage goes on.",
                  reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}, colorMode="value"),
            row("Throughput", 12),
            panel("Rows written per second", [target(f"sum by (stage) (rate(ray_ktray_rows_written_total{{{RUN}}}"
                                                     f"[{RATE}]))", "{{stage}}")],
                  (0, 13, 12, 8), unit="short",
                  description="Rows each stage wrote to its output tables (features, labels, results)."),
            panel("Images decoded per second", [target(decoded, "{{stage}}")], (12, 13, 12, 8),
                  description="JPEG decodes in the Ray Data pipelines of each stage (CPU-bound: ~150 per core)."),
            panel("Puzzles built and images embedded per second", [
                target(f"sum(rate(ray_ktray_puzzles_built_total{{{RUN}}}[{RATE}]))", "puzzles (pretext)", "A"),
                target(f"sum(rate(ray_ktray_embed_rows_total{{{RUN}}}[{RATE}]))", "embedded (embed)", "B"),
            ], (0, 21, 12, 8)),
            panel("Decode failures per second", [
                target(f"sum by (stage) (rate(ray_ktray_decode_failures_total{{{RUN}}}[{RATE}])) "
                       f"or {decoded} * 0", "{{stage}}")
            ], (12, 21, 12, 8), description="0 while every image decodes (the series starts with the first decode)."),
        ],
    )


def training() -> dict[str, Any]:
    return dashboard(
        "ktray-training",
        "ktray / Training",
        "Ray Train stages (pretext: Jigsaw++ teacher; transfer: student on cluster ids) and the GPUs under them.",
        [
            row("Optimisation", 0),
            panel("Loss", [target(f"avg by (stage, split) (ray_ktray_train_loss{{{RUN}}})", "{{stage}} {{split}}")],
                  (0, 1, 12, 8), description="Mean loss of each reported epoch, averaged over Train workers."),
            panel("Accuracy", [target(f"avg by (stage, split) (ray_ktray_train_accuracy{{{RUN}}})",
                                      "{{stage}} {{split}}")],
                  (12, 1, 12, 8), unit="percentunit",
                  description="Pretext: permutation accuracy; transfer: pseudo-label (cluster id) accuracy."),
            panel("Samples per second", [
                target(f"sum by (stage) (ray_ktray_train_samples_per_second{{{RUN}}})", "{{stage}} reported", "A"),
                target(f"sum by (stage) (rate(ray_ktray_train_samples_total{{{RUN}}}[{RATE}]))", "{{stage}} counted",
                       "B"),
            ], (0, 9, 12, 8), description="Summed over Train workers: what the workers report per epoch, and the "
                                           "rate of the samples counter."),
            panel("Epoch", [target(f"max by (stage) (ray_ktray_train_epoch{{{RUN}}})", "{{stage}}")],
                  (12, 9, 12, 8), kind="stat",
                  reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}),
            row("Hardware (Ray's own metrics)", 17),
            panel("GPU utilisation", [
                target(f"avg by (instance, GpuIndex) (ray_node_gpus_utilization{{{SESSION}}}) / 100",
                       "{{instance}} GPU {{GpuIndex}}")
            ], (0, 18, 8, 8), unit="percentunit",
                  description="Ray's node metrics (NVML). Low while training: the input pipeline starves the GPU."),
            panel("GPU memory used", [
                target(f"sum by (instance, GpuIndex) (ray_node_gram_used{{{SESSION}}}) * 1024 * 1024",
                       "{{instance}} GPU {{GpuIndex}}")
            ], (8, 18, 8, 8), unit="bytes"),
            panel("CPU utilisation", [
                target(f"avg by (instance) (ray_node_cpu_utilization{{{SESSION}}}) / 100", "{{instance}}")
            ], (16, 18, 8, 8), unit="percentunit",
                  description="Decoding and puzzle building run on CPUs: busy CPUs + idle GPUs = add CPU workers."),
        ],
    )


def clustering() -> dict[str, Any]:
    return dashboard(
        "ktray-clustering",
        "ktray / Clustering",
        "Distributed k-means on the teacher's conv4 features: objective, empty clusters and cluster sizes.",
        [
            panel("Objective", [target(f"max by (stage) (ray_ktray_kmeans_objective{{{RUN}}})", "{{stage}}")],
                  (0, 0, 12, 8),
                  description="Sum of squared distances to the nearest centroid after each Lloyd step; should fall "
                              "fast, then flatten."),
            panel("Lloyd iteration", [target(f"max by (stage) (ray_ktray_kmeans_iteration{{{RUN}}})", "{{stage}}")],
                  (12, 0, 6, 8), kind="stat",
                  reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}),
            panel("Empty clusters split (total)",
                  [target(f"sum by (stage) (ray_ktray_kmeans_empty_splits_total{{{RUN}}}) "
                          f"or max by (stage) (ray_ktray_kmeans_iteration{{{RUN}}}) * 0", "{{stage}}")],
                  (18, 0, 6, 8), kind="stat",
                  description="faiss's rule: an empty cluster takes a copy of a large one, both nudged apart.",
                  reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}),
            panel("Empty clusters per iteration",
                  [target(f"max by (stage) (ray_ktray_kmeans_empty_clusters{{{RUN}}})", "{{stage}}")],
                  (0, 8, 12, 8), description="Many early on is normal; many late means k is too large for the data."),
            panel("Cluster-size spread", [
                target(f"max by (stat) (ray_ktray_kmeans_cluster_size{{{RUN}}})", "{{stat}}", "A"),
            ], (12, 8, 12, 8), unit="short",
                  description="min, p10, median, p90 and max images per cluster. A max far above the median is a "
                              "degenerate cluster the student would learn little from."),
            panel("Imbalance (max / median size)", [
                target(f'max(ray_ktray_kmeans_cluster_size{{{RUN}, stat="max"}}) / '
                       f'max(ray_ktray_kmeans_cluster_size{{{RUN}, stat="median"}})', "max / median"),
            ], (0, 16, 12, 6), kind="stat", reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}),
        ],
    )


def build() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"ktray-{d['uid'].removeprefix('ktray-')}.json": json.dumps(d, indent=2) + "\n"
        for d in (pipeline(), training(), clustering())
    }


def main() -> None:
    for name, text in build().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
