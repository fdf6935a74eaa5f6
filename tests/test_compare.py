"""``ktray compare``: the baselines table (rows x taps, kNN, few-shot, NMI) as Markdown, CSV and PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ktray import compare
from ktray.config import load_config
from ktray.stages.evaluate import format_csv, format_markdown, result_row


def fake_results(name: str, tops: dict[str, float], nmi: float | None) -> dict:
    res = {
        "name": name,
        "taps": {t: {"top1": v} for t, v in tops.items()},
        "best_tap": max(tops, key=tops.get),
        "knn_top1": 0.5,
        "fewshot": {"mean": 0.6, "ci95": 0.012},
    }
    if nmi is not None:
        res["nmi"] = nmi
    return res


def test_table_layout() -> None:
    taps = ("conv1", "conv3")
    rows = [
        result_row(fake_results("Random", {"conv1": 0.12, "conv3": 0.1}, None), taps),
        result_row(fake_results("CC+HOG", {"conv1": 0.2, "conv3": 0.345}, 0.4321), taps),
    ]
    md = format_markdown(rows, taps).splitlines()
    assert md[0] == "| method | conv1 | conv3 | kNN | few-shot | NMI |"
    assert md[2] == "| Random | 12.0 | 10.0 | 50.0 [conv1] | 60.0 ± 1.2 | - |"
    assert md[3] == "| CC+HOG | 20.0 | 34.5 | 50.0 [conv3] | 60.0 ± 1.2 | 0.432 |"
    parsed = list(csv.DictReader(format_csv(rows).splitlines()))
    assert [r["name"] for r in parsed] == ["Random", "CC+HOG"]
    assert float(parsed[1]["conv3"]) == 0.345 and math.isnan(float(parsed[0]["nmi"]))


def test_intervals_and_seeds_in_the_table() -> None:
    taps = ("conv4",)
    res = fake_results("CC+Jigsaw++", {"conv4": 0.5}, None)
    res["taps"]["conv4"]["ci95"] = [0.48, 0.52]
    res["knn_ci95"] = [0.47, 0.53]
    row = result_row(res, taps)
    assert format_markdown([row], taps).splitlines()[2] == (
        "| CC+Jigsaw++ | 50.0 (48.0-52.0) | 50.0 (47.0-53.0) [conv4] | 60.0 ± 1.2 | - |")
    figures = {compare.seeded_key("cc_jigsaw", s): v for s, v in enumerate((0.5, 0.52, 0.54))}
    seeded = {key: {**row, "conv4": v, "knn": v} for key, v in figures.items()}
    seeded["random"] = {**row, "name": "Random"}  # one seed: no line of its own
    lines = compare.seeds_table(seeded, taps).splitlines()
    assert len(lines) == 3 and lines[2] == (
        "| CC+Jigsaw++ | 3 | 52.0 ± 2.0 (50.0, 52.0, 54.0) | 52.0 ± 2.0 (50.0, 52.0, 54.0) |")


def test_claims_are_scored_image_by_image(tmp_path: Path) -> None:
    import io

    import numpy as np

    from ktray.artifacts import PREDICTIONS
    from ktray.rundir import stage_dir

    cfg = load_config("tiny")
    ids = np.array([f"val/{i:04d}" for i in range(400)])
    right = {"random": np.arange(400) < 100, "jigsaw": np.arange(400) < 200, "cc_jigsaw": np.arange(400) < 260}
    evaluated = {}
    for key, correct in right.items():
        sd = stage_dir(str(tmp_path), "evaluate", {"row": key})
        sd.make()
        buf = io.BytesIO()
        np.savez(buf, image_id=ids, conv4=correct, knn=correct)
        Path(sd.path(PREDICTIONS)).write_bytes(buf.getvalue())
        evaluated[key] = sd
    lines = compare.claims_table(cfg, evaluated, ("conv4",)).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| CC+Jigsaw++ − Jigsaw++ (student)",
                                                           "| Jigsaw++ (student) − Random"]
    assert lines[2].split(" | ")[1].startswith("+15.0 (")  # 60 of 400 images more
    np.savez(buf := io.BytesIO(), image_id=ids[::-1], conv4=right["random"], knn=right["random"])
    Path(evaluated["random"].path(PREDICTIONS)).write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="different val images"):
        compare.claims_table(cfg, evaluated, ("conv4",))


def test_reseeded_draws_pretext_clustering_and_transfer_anew() -> None:
    cfg = load_config("tiny")
    assert compare.reseeded(cfg, 0) is cfg
    two = compare.reseeded(cfg, 2)
    assert (two.seed, two.cluster.seed) == (cfg.seed + 2, cfg.cluster.seed + 2)


@pytest.mark.slow
def test_compare_runs_the_rows_and_writes_the_table(ray_session: None, run_root: str) -> None:
    cfg = load_config(None, [
        f"root={run_root}",
        "data.limit=200",
        "compute.num_workers=1",
        "compute.cpus_per_worker=1",
        "cluster.k=8",
        "cluster.niter=5",
        "transfer.width=0.25",
        "transfer.image_size=48",
        "transfer.epochs=1",
        "transfer.batch_size=32",
        "transfer.lr=0.005",
        "evaluate.image_size=48",
        "evaluate.taps=[conv3, conv5]",
        "evaluate.fewshot_episodes=50",
        "evaluate.probe_max_iter=50",
        "evaluate.hog_words=32",
        "evaluate.hog_image_size=48",
        "evaluate.hog_vocab_images=50",
        "evaluate.compare_rows=[random, cc_hog]",  # Supervised trains like CC+HOG: test_evaluate covers its labels
    ])
    sd = compare.run(cfg)
    assert sd.done()
    md = Path(sd.path("compare.md")).read_text().splitlines()
    assert md[0] == "| method | conv3 | conv5 | kNN | few-shot | NMI |"
    names = [line.split("|")[1].strip() for line in md[2:4]]
    assert names == ["Random", "CC+HOG"]
    # Only the clustered row has pseudo-labels to score against the real labels.
    nmis = [line.split("|")[-2].strip() for line in md[2:4]]
    assert nmis[0] == "-" and 0 <= float(nmis[1]) <= 1
    rows = list(csv.DictReader(Path(sd.path("compare.csv")).read_text().splitlines()))
    assert [r["name"] for r in rows] == names and all(0 <= float(r["conv5"]) <= 1 for r in rows)
    assert Path(sd.path("compare.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every row's stages are in the run directory; a second compare finds them all done.
    stages = {p.name.split("-")[0] for p in Path(run_root).iterdir() if (p / "manifest.json").exists()}
    assert {"evaluate", "transfer", "cluster", "hog", "compare"} <= stages
    assert compare.run(cfg) == sd
