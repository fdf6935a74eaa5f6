"""Ray Tune sweep over ``cluster.k`` and ``pretext.max_foreign``.

Tune runs one *driver function* per trial (the Train V2 pattern: Tune no longer wraps a
trainer); the function runs the pipeline for its (k, max_foreign) and reports the
evaluation's objective. Trials share finished stages through the run directory, so a 3x3
grid trains the teacher 3 times (once per max_foreign), embeds 3 times and clusters 9 times;
two trials that need the same stage at once wait on its lock instead of both computing it.
Each trial is an MLflow run with a nested run per stage.

Tune records every trial's config on disk (experiment state, ``params.json``, ``result.json``)
and prints it, so the config it gets carries ``tracking.uri`` without userinfo; the trials get
the credentials through the object store (``tune.with_parameters``) and put them where MLflow
reads them (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from ktray.config import Config, replace
from ktray.pipeline import run_stages
from ktray.plots import sweep_chart
from ktray.rundir import config_hash, filesystem, join, write_bytes_atomic
from ktray.runtime import init_ray
from ktray.tracking import Tracker, tracking_credentials, without_credentials

log = logging.getLogger(__name__)


def objective(summary: dict[str, float], metric: str) -> float:
    """The sweep's objective from an evaluate summary: best linear top-1 over taps, or kNN."""
    if metric == "knn_top1":
        return float(summary["knn_top1"])
    return max(float(v) for k, v in summary.items() if k.startswith("top1_"))


def trial_config(cfg: Config, k: int, max_foreign: int) -> Config:
    return replace(cfg, [f"cluster.k={k}", f"pretext.max_foreign={max_foreign}"])


def sweep_key(cfg: Config) -> str:
    """The sweep's id (its folder ``sweep-<id>``, the trials' ``ktray.sweep`` tag): a hash of the
    config without tracking credentials, so no name derives from a password and a new password
    keeps the sweep."""
    return config_hash(without_credentials(cfg).to_dict())


def trial_space(cfg: Config, sweep_id: str) -> dict[str, Any]:
    """Tune's param space: the grid, and the base config without tracking credentials (Tune
    records and prints every trial's config)."""
    from ray import tune

    return {
        "k": tune.grid_search(list(cfg.sweep.k)),
        "max_foreign": tune.grid_search(list(cfg.sweep.max_foreign)),
        "base": without_credentials(cfg).to_dict(),
        "sweep_id": sweep_id,
    }


def run_trial(params: dict[str, Any], credentials: dict[str, str] | None = None) -> None:
    """Tune's driver function: one pipeline run for one (k, max_foreign), tracking with ``credentials``
    (MLflow's env vars, from the object store; never in ``params``, which Tune records)."""
    from ray import tune

    os.environ.update(credentials or {})
    base = Config.from_dict(params["base"])
    cfg = trial_config(base, params["k"], params["max_foreign"])
    tracker = Tracker(cfg)
    name = f"{cfg.name}:k={cfg.cluster.k},max_foreign={cfg.pretext.max_foreign}"
    with tracker.pipeline_run(name, tags={"ktray.sweep": params["sweep_id"]}):
        stages = run_stages(cfg, tracker=tracker)
    summary = stages["evaluate"].manifest()["metrics"]["summary"]
    tune.report({
        "objective": objective(summary, cfg.sweep.metric),
        **{k: float(v) for k, v in summary.items()},
        "evaluate_dir": stages["evaluate"].uri,
        "pretext_dir": stages["pretext"].uri,
    })


def run(cfg: Config) -> list[dict[str, Any]]:
    """``ktray sweep``: the grid, the results table, the best configuration and a plot."""
    from ray import tune

    init_ray()
    sweep_id = sweep_key(cfg)
    out_uri = join(cfg.root, f"sweep-{sweep_id}")
    # Tune's own experiment folder lives inside the sweep's, so the run root holds one sweep-<hash>.
    _, storage = filesystem(out_uri)
    import ray

    # A trial is a driver: it only waits while its Train workers use the CPUs and GPUs. On a
    # cluster from cluster.yaml, the head's `ktray_driver` resource keeps drivers off spot nodes.
    # Tune refuses an empty bundle, and any CPU share (even 0.01) leaves the Ray Data tasks
    # that feed the workers short of a whole core: the sweep deadlocked. Reserve memory only.
    resources = {"CPU": 0.0, "memory": float(64 * 2**20)}
    if ray.cluster_resources().get("ktray_driver"):
        resources["ktray_driver"] = 1.0
    trainable = tune.with_resources(tune.with_parameters(run_trial, credentials=tracking_credentials(cfg)), resources)
    tuner = tune.Tuner(
        trainable,
        param_space=trial_space(cfg, sweep_id),
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=out_uri if "://" in out_uri else storage, verbose=1),
    )
    t0 = time.time()
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error is not None:
            log.error("trial %s failed: %s", result.config and {k: result.config[k] for k in ("k", "max_foreign")},
                      result.error)
            continue
        m = result.metrics
        rows.append({"k": result.config["k"], "max_foreign": result.config["max_foreign"],
                     "objective": m["objective"], "knn_top1": m.get("knn_top1"), "nmi": m.get("nmi"),
                     "evaluate_dir": m["evaluate_dir"], "pretext_dir": m["pretext_dir"]})
    if not rows:
        raise RuntimeError("every sweep trial failed; see the errors above")
    rows.sort(key=lambda r: (r["max_foreign"], r["k"]))
    best = max(rows, key=lambda r: r["objective"])
    table = format_rows(rows, cfg.sweep.metric)
    write_bytes_atomic(join(out_uri, "results.md"), (table + "\n").encode())
    write_bytes_atomic(join(out_uri, "results.json"), json.dumps({"rows": rows, "best": best}, indent=2).encode())
    sweep_chart(rows, join(out_uri, "accuracy_vs_k.png"), cfg.sweep.metric)
    print(table)
    print(f"\nbest: k={best['k']}, max_foreign={best['max_foreign']} ({cfg.sweep.metric} {best['objective']:.4f})")
    print(f"sweep of {len(rows)} trials in {time.time() - t0:.0f} s; results in {out_uri}")
    return rows


def format_rows(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"| max_foreign | k | {metric} | knn_top1 | nmi |", "|---|---|---|---|---|"]
    for r in rows:
        nmi = "" if r["nmi"] is None else f"{r['nmi']:.4f}"
        knn = "" if r["knn_top1"] is None else f"{r['knn_top1']:.4f}"
        lines.append(f"| {r['max_foreign']} | {r['k']} | {r['objective']:.4f} | {knn} | {nmi} |")
    return "\n".join(lines)
