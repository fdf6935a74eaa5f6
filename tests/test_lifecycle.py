"""The one stage lifecycle, without Ray: compute once, reuse, --force, the boundary check, the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ktray.config import load_config
from ktray.lifecycle import Output, StageSpec, ensure
from ktray.rundir import StageDir, read_events
from ktray.tracking import Tracker


def write_answer(cfg: object, sd: StageDir, value: int) -> Output:
    Path(sd.path("answer.json")).write_text(json.dumps({"value": value}))
    return Output(["answer.json"], {"value": float(value)}, [{"step": 1, "loss": 0.5}])


def spec(root: str, value: int = 42, check: object = None) -> StageSpec:
    cfg = load_config("tiny", [f"root={root}"])
    return StageSpec("answer", cfg, {"value": value}, ["data-abc"], write_answer, args=(value,),
                     check=check, needs_ray=False)  # type: ignore[arg-type]


def test_a_stage_is_computed_once_then_reused_and_forced(run_root: str) -> None:
    from mlflow import MlflowClient

    tracker = Tracker(spec(run_root).cfg)  # MLflow's SQLite store in the run root
    with tracker.pipeline_run("lifecycle") as parent:
        sd = ensure(spec(run_root), tracker=tracker)
        manifest = sd.manifest()
        # One description of the stage: the params are the folder's hash, the manifest's config, the MLflow params.
        assert sd == spec(run_root).dir and manifest["config"] == {"value": 42}
        assert manifest["inputs"] == ["data-abc"] and manifest["files"] == ["answer.json"]
        assert manifest["metrics"] == {"summary": {"value": 42.0}, "history": [{"step": 1, "loss": 0.5}]}

        mtime = Path(sd.path("manifest.json")).stat().st_mtime_ns
        assert ensure(spec(run_root), tracker=tracker) == sd
        assert Path(sd.path("manifest.json")).stat().st_mtime_ns == mtime
    runs = MlflowClient(tracker.uri).search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["ktray.reused"] for r in runs) == ["false", "true"]
    assert all(r.data.params == {"value": "42"} for r in runs)

    other = ensure(spec(run_root, value=7))
    assert other != sd and json.loads(Path(other.path("answer.json")).read_text()) == {"value": 7}

    ensure(spec(run_root), force=True)
    events = [(e["dir"], e["event"]) for e in read_events(run_root)]
    assert events.count((sd.name, "started")) == 2 and events.count((sd.name, "finished")) == 2
    assert events.count((sd.name, "reused")) == 1


def test_a_refused_input_leaves_no_folder(run_root: str) -> None:
    def refuse() -> None:
        raise ValueError("labels: 3 image_ids missing")

    s = spec(run_root, check=refuse)
    with pytest.raises(ValueError, match="3 image_ids missing"):
        ensure(s)
    assert not Path(s.dir.uri).exists()


def test_a_failed_compute_is_never_done(run_root: str) -> None:
    def fail(cfg: object, sd: StageDir) -> Output:
        Path(sd.path("partial.bin")).write_bytes(b"half")
        raise RuntimeError("worker lost")

    cfg = load_config("tiny", [f"root={run_root}"])
    s = StageSpec("flaky", cfg, {}, [], fail, needs_ray=False)
    with pytest.raises(RuntimeError, match="worker lost"):
        ensure(s)
    assert not s.dir.done()  # what it left (a checkpoint, say) stays for a resume, but never counts as finished
