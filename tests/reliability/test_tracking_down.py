"""Fault: the MLflow server goes away while the pipeline runs.

Must: training does not die; what could not be logged is logged once the server is back
(each stage once, each epoch once), or, if it never comes back, the run ends normally with a
warning naming what was not logged, while the run directory still holds everything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from faults import start_run, wait_for_event
from local_cluster import MlflowServer
from workloads import FAST_PIPELINE

from ktray.config import STAGES, load_config
from ktray.rundir import StageDir
from ktray.tracking import Tracker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # minutes on CI; more on a loaded machine


def _stage_dirs(root: Path) -> list[StageDir]:
    dirs = []
    for stage in STAGES:
        (path,) = root.glob(f"{stage}-*/manifest.json")
        name = path.parent.name
        dirs.append(StageDir(stage, name.split("-", 1)[1], str(path.parent)))
    return dirs


def test_server_killed_mid_run_and_back_before_the_end(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    server = MlflowServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    root, log = tmp_path / "runs", tmp_path / "driver.log"
    try:
        proc = start_run(str(root), log, f"tracking.uri={server.uri}", "tracking.experiment=down")
        assert wait_for_event(str(root), proc, "pretext", "finished", 1)
        server.kill()  # the fault: gone while embed, cluster and transfer run
        assert wait_for_event(str(root), proc, "transfer", "started", 1)
        server.start()  # back (same port, same store) before the pipeline ends
        assert proc.wait(1200) == 0, log.read_text()[-4000:]

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("down")
        (parent,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'tiny'")
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        by_stage = sorted(c.data.tags["ktray.stage"] for c in children)
        assert by_stage == sorted(STAGES), f"each stage logged exactly once, got {by_stage}"
        assert all(c.info.status == "FINISHED" for c in children)
        for c in children:
            if c.data.tags["ktray.stage"] in ("pretext", "transfer"):
                steps = [m.step for m in client.get_metric_history(c.info.run_id, "loss")]
                assert sorted(steps) == [1, 2], f"{c.data.tags['ktray.stage']}: loss steps {steps}"
        assert "could not log stage" in log.read_text(), "the outage was not even noticed"
    finally:
        server.stop()

    # The server goes away for good: logging degrades to a warning naming what is missing; nothing raises.
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
    finally:
        logging.getLogger("ktray.tracking").removeHandler(handler)
        server.stop()
    final = [r.getMessage() for r in records if "stayed unreachable" in r.getMessage()]
    assert final, [r.getMessage() for r in records]
    for stage in STAGES:
        assert f"log stage {stage}-" in final[-1]
    assert all(sd.done() for sd in _stage_dirs(root))
