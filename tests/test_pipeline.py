"""The pipeline as users run it: a Ray job on a real cluster, tracked by a real MLflow server.

One pipeline is computed once, through ``ray job submit`` on a ``ray start --head`` cluster
(a separate process), logging to an ``mlflow server`` on loopback; the tests after it reuse
that run root to check reruns, changed parameters, ``--force`` and sweeps.

The MLflow server is killed while the job runs (after pretext, while embed, cluster and
transfer run) and brought back before the end. Must: training does not die; what could not
be logged is logged once the server is back (each stage once, each epoch once); a server
that never comes back leaves a warning naming what was not logged, and the run directory
still holds everything.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from local_cluster import LocalCluster, MlflowServer, free_ports
from workloads import FAST_PIPELINE

from ktray import pipeline, sweep
from ktray.config import STAGES, load_config
from ktray.data.shards import image_ids, sample_path
from ktray.rundir import StageDir, read_events
from ktray.stages import cluster, embed, pretext
from ktray.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Ray cluster started by ``ray start --head`` in its own processes (no token)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("head"), token=None)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def job_run(
    ray_head: LocalCluster, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The pipeline, submitted as a Ray job exactly as the README shows."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = str(tmp_path_factory.mktemp("job") / "runs")
    client = JobSubmissionClient(ray_head.dashboard)
    job_id = client.submit_job(
        entrypoint=" ".join(shlex.quote(arg) for arg in [  # the entrypoint is a shell command line
            "python", "jobs/pipeline.py", "--config", "tiny", f"root={root}", f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=pipeline-test", *FAST_PIPELINE,
        ]),
        runtime_env={"working_dir": str(REPO), "excludes": [".venv/", "runs/", ".git/", "*.egg-info/"]},
    )
    deadline = time.time() + 2000  # about 5 min on a quiet 2-core machine, 15 under heavy load
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    def wait_for(stage: str, event: str) -> bool:
        """Until ``stage`` logged ``event``; False if the job ended first."""
        while time.time() < deadline:
            if any(e["stage"] == stage and e["event"] == event for e in read_events(root)):
                return True
            if client.get_job_status(job_id) in ended:
                return False
            time.sleep(0.5)
        raise TimeoutError(f"no {event} event for {stage}")

    # The fault: the tracking server is gone while embed, cluster and transfer run, and back before the end.
    outage = wait_for("pretext", "finished")
    if outage:
        mlflow_server.kill()
        wait_for("transfer", "started")
        mlflow_server.start()
    status = client.get_job_status(job_id)
    while status not in ended and time.time() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert outage, "the job ended before the tracking server could be taken away"
    return {"root": root, "logs": logs, "mlflow": mlflow_server.uri}


def _cfg(root: str, *extra: str):
    return load_config("tiny", [f"root={root}", *FAST_PIPELINE, *extra])


@pytest.mark.slow
@pytest.mark.timeout(2400)  # its fixture submits the whole pipeline as a Ray job (see job_run)
def test_job_runs_the_whole_pipeline(job_run: dict[str, str]) -> None:
    root = job_run["root"]
    assert "| stage |" in job_run["logs"] and "pipeline finished" in job_run["logs"]
    dirs = {p.name.split("-")[0]: p for p in Path(root).iterdir() if (p / "manifest.json").exists()}
    assert set(dirs) == set(STAGES)
    labels = pq.read_table(dirs["cluster"] / "labels.parquet")
    train_ids = image_ids(sample_path(), "train", 200).to_pylist()
    assert sorted(labels["image_id"].to_pylist()) == sorted(train_ids)
    assert (dirs["evaluate"] / "summary.md").exists() and (dirs["transfer"] / "student.pt").exists()
    started = [e["stage"] for e in read_events(root) if e["event"] == "started"]
    assert sorted(started) == sorted(STAGES)  # each stage computed exactly once


@pytest.mark.slow
def test_mlflow_server_received_parent_and_nested_runs(job_run: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(job_run["mlflow"])
    exp = client.get_experiment_by_name("pipeline-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["cluster.k"] == "10"
    parent = parents[0]
    children = {
        r.data.tags["ktray.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(STAGES)
    # One point per epoch (steps are epochs), none twice: logged while the server was up, and after it came back.
    for stage in ("pretext", "transfer"):
        steps = [m.step for m in client.get_metric_history(children[stage].info.run_id, "loss")]
        assert sorted(steps) == [1, 2], f"{stage}: loss steps {steps}"
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert "could not log stage" in job_run["logs"], "the outage was not even noticed"
    assert children["cluster"].data.params["k"] == "10"
    assert "nmi" in children["cluster"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(children["cluster"].info.run_id)}
    assert {"manifest.json", "gallery.png"} <= artifacts
    assert "student.pt" in {a.path for a in client.list_artifacts(children["transfer"].info.run_id)}
    assert "summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def _stage_dirs(root: Path) -> list[StageDir]:
    dirs = []
    for stage in STAGES:
        (path,) = root.glob(f"{stage}-*/manifest.json")
        name = path.parent.name
        dirs.append(StageDir(stage, name.split("-", 1)[1], str(path.parent)))
    return dirs


@pytest.mark.slow
def test_tracking_server_gone_for_good_leaves_a_warning(
    job_run: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logging degrades to a warning naming what is missing; nothing raises; the run directory holds everything."""
    # No HTTP retries: each refused call fails at once instead of after MLflow's backoff (the
    # behaviour under test, the warning, is the same; the test takes seconds, not a minute).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root = Path(job_run["root"])
    server = MlflowServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    cfg = load_config("tiny", [f"root={root}", *FAST_PIPELINE, f"tracking.uri={server.uri}",
                               "tracking.experiment=gone"])
    tracker = Tracker(cfg)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("ktray.tracking").addHandler(handler)
    try:
        with tracker.pipeline_run("gone"):
            server.kill()
            for sd in _stage_dirs(root):
                tracker.log_stage(sd, reused=True)
            monkeypatch.setattr(tracker, "flush", functools.partial(tracker.flush, wait=0.1))
    finally:
        logging.getLogger("ktray.tracking").removeHandler(handler)
        server.stop()
    final = [r.getMessage() for r in records if "stayed unreachable" in r.getMessage()]
    assert final, [r.getMessage() for r in records]
    for stage in STAGES:
        assert f"log stage {stage}-" in final[-1]
    assert all(sd.done() for sd in _stage_dirs(root))


@pytest.mark.slow
def test_rerun_does_no_work(job_run: dict[str, str], ray_session: None) -> None:
    root = job_run["root"]
    before = {p: p.stat().st_mtime_ns for p in Path(root).glob("*/manifest.json")}
    n_events = len(read_events(root))
    pipeline.run(_cfg(root))
    assert {p: p.stat().st_mtime_ns for p in Path(root).glob("*/manifest.json")} == before
    new = read_events(root)[n_events:]
    assert [e["event"] for e in new] == ["reused"] * len(STAGES)


@pytest.mark.slow
def test_changing_k_recomputes_only_what_depends_on_it(job_run: dict[str, str], ray_session: None) -> None:
    root = job_run["root"]
    n_events = len(read_events(root))
    pipeline.run(_cfg(root, "cluster.k=12"))
    new = read_events(root)[n_events:]
    assert sorted(e["stage"] for e in new if e["event"] == "started") == ["cluster", "evaluate", "transfer"]
    assert sorted(e["stage"] for e in new if e["event"] == "reused") == ["embed", "pretext"]


@pytest.mark.slow
def test_force_recomputes_from_a_stage_on(job_run: dict[str, str], ray_session: None) -> None:
    root = job_run["root"]
    n_events = len(read_events(root))
    pipeline.run(_cfg(root), force="evaluate")
    new = read_events(root)[n_events:]
    assert [e["stage"] for e in new if e["event"] == "started"] == ["evaluate"]


def test_unreachable_tracking_server_fails_before_work(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "ktray", "run", "tiny", f"root={root}", f"tracking.uri=http://127.0.0.1:{free_ports(1)[0]}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unreachable" in proc.stderr
    assert not any(p.name.startswith("pretext-") for p in root.glob("*"))


def test_sweep_trials_share_one_teacher_per_max_foreign() -> None:
    """The grid's trials differ only where they must: one pretext (and embed) folder per max_foreign,
    one cluster folder per (k, max_foreign). Trials reuse each other's folders as any run does."""
    cfg = load_config("tiny", ["root=/nonexistent/runs", *FAST_PIPELINE])
    grid = [(k, m) for k in (10, 12, 14) for m in (0, 1, 2)]
    teachers = {(k, m): pretext.output_dir(sweep.trial_config(cfg, k, m)) for k, m in grid}
    assert len(set(teachers.values())) == 3
    assert all(teachers[k, m] == teachers[10, m] for k, m in grid)
    features = {m: embed.output_dir(sweep.trial_config(cfg, 10, m), teachers[10, m]) for m in (0, 1, 2)}
    assert len(set(features.values())) == 3
    clusters = {cluster.output_dir(sweep.trial_config(cfg, k, m), features[m]) for k, m in grid}
    assert len(clusters) == len(grid)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_runs_the_grid_in_the_jobs_run_root(job_run: dict[str, str], ray_session: None) -> None:
    """Tune runs k in {10, 12} in the job's run root: every stage is reused from the job (k=10) and
    from test_changing_k (k=12; computed here when that test did not run), and the sweep writes its
    table, its best trial and its plot."""
    root = job_run["root"]
    n_events = len(read_events(root))
    rows = sweep.run(_cfg(root, "sweep.k=[10, 12]", "sweep.max_foreign=[2]"))
    assert sorted((r["k"], r["max_foreign"]) for r in rows) == [(10, 2), (12, 2)]
    assert len({r["pretext_dir"] for r in rows}) == 1
    new = read_events(root)[n_events:]
    started = [e for e in new if e["event"] == "started"]
    assert not [e for e in started if e["stage"] in ("pretext", "embed")], started
    dirs = [e["dir"] for e in started]
    assert len(dirs) == len(set(dirs)), f"a stage folder computed twice: {dirs}"
    assert sum(e["stage"] == "cluster" for e in new if e["event"] in ("started", "reused")) == 2
    sweep_dirs = list(Path(root).glob("sweep-*"))
    assert len(sweep_dirs) == 1, f"one folder per sweep, Tune's inside it: {sweep_dirs}"
    sweep_dir = sweep_dirs[0]
    result = json.loads((sweep_dir / "results.json").read_text())
    assert result["best"]["objective"] == max(r["objective"] for r in rows)
    assert (sweep_dir / "accuracy_vs_k.png").stat().st_size > 0
