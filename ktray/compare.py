"""``ktray compare``: the paper's comparison table, every row evaluated the same way.

Rows (Noroozi et al. 2018, Tables 2-5), all for the same student architecture:

- ``Random``: a randomly initialised student, the floor;
- ``Jigsaw++ (student)``: the pretext task trained directly on the student's architecture;
- ``CC+Jigsaw++``: that teacher (the student's architecture), clustered, transferred;
- ``CC+deep-Jigsaw++``: the configured (deeper) teacher, clustered, transferred: the headline row;
- ``CC+HOG``: clusters of HOG bag-of-words features (no learning at all), transferred;
- ``Supervised``: the student trained on the real labels, the ceiling;
- ``ISD (student)``: ISD (Tejankar et al. 2020) trained directly on the student's architecture;
- ``CC+ISD (deep teacher)``: an ISD teacher of the configured (deeper) architecture, clustered, transferred;
- ``Distill+deep-Jigsaw++``: the deep Jigsaw++ teacher, transferred by similarity distillation
  (the student matches its similarities over a queue of its embed features) instead of clusters.

Every row is a chain of ordinary stages in the run directory, so rows share what they can
(``CC+Jigsaw++`` reuses the teacher of ``Jigsaw++ (student)``) and a rerun recomputes
nothing that is done. The table (rows x taps, plus kNN, few-shot and NMI) is written as
Markdown and CSV with a bar chart, in a ``compare-<hash>`` folder.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from ktray.algos.probes import paired_interval
from ktray.artifacts import PREDICTIONS, RESULTS, STUDENT, TEACHER
from ktray.config import RANDOM_TRUNK, replace
from ktray.data.shards import data_path
from ktray.lifecycle import Output, StageSpec, ensure
from ktray.plots import bar_chart
from ktray.rundir import StageDir, read_bytes, write_bytes_atomic
from ktray.runtime import init_ray
from ktray.stages import cluster, embed, evaluate, hog, pretext, real_labels, transfer

if TYPE_CHECKING:
    from ktray.config import Config

ROWS = {
    "random": "Random",
    "jigsaw": "Jigsaw++ (student)",
    "cc_jigsaw": "CC+Jigsaw++",
    "cc_deep": "CC+deep-Jigsaw++",
    "cc_hog": "CC+HOG",
    "supervised": "Supervised",
    "isd": "ISD (student)",
    "cc_isd": "CC+ISD (deep teacher)",
    "distill_deep": "Distill+deep-Jigsaw++",
}
TABLE = "compare"  # compare.md, compare.csv, compare.png


def student_teacher(cfg: Config) -> Config:
    """The config whose pretext trains the student's own architecture (rows Jigsaw++, CC+Jigsaw++)."""
    return replace(cfg, [f"pretext.arch={cfg.transfer.arch}", f"pretext.width={cfg.transfer.width}"])


def reseeded(cfg: Config, offset: int) -> Config:
    """The config of training seed ``offset`` (0: ``cfg`` itself): the pretext task, the clustering
    and the transfer drawn anew (and the probes' train/held-out split and few-shot episodes with them)."""
    if offset == 0:
        return cfg
    return replace(cfg, [f"seed={cfg.seed + offset}", f"cluster.seed={cfg.cluster.seed + offset}"])


def _transfer_and_evaluate(cfg: Config, labels: StageDir, name: str, nmi: bool = True) -> StageDir:
    student = transfer.run(cfg, labels)
    return evaluate.run(cfg, student.path(STUDENT), labels if nmi else None, name=name)


def _cluster(cfg: Config, features: StageDir) -> StageDir:
    return cluster.run(cfg, features, images=data_path(cfg.data))


def row(cfg: Config, key: str) -> StageDir:
    """Compute (or find done) the evaluate stage of one row."""
    # Each row names its own methods: a config that says isd or distill does not change the others.
    jig = replace(cfg, ["pretext.method=jigsaw", "transfer.method=cluster"])
    isd = replace(jig, ["pretext.method=isd"])
    t = cfg.transfer
    if key == "isd":
        return evaluate.run(cfg, pretext.run(student_teacher(isd)).path(TEACHER), name=ROWS[key])
    if key == "cc_isd":
        return _transfer_and_evaluate(isd, _cluster(isd, embed.run(isd, pretext.run(isd))), ROWS[key])
    if key == "distill_deep":
        distill = replace(jig, ["transfer.method=distill"])
        return _transfer_and_evaluate(distill, embed.run(jig, pretext.run(jig)), ROWS[key], nmi=False)
    cfg = jig
    if key == "random":
        return evaluate.run(cfg, f"{RANDOM_TRUNK}{t.arch}:{t.width:g}", name=ROWS[key])
    if key in ("jigsaw", "cc_jigsaw"):
        small = student_teacher(cfg)
        teacher = pretext.run(small)
        if key == "jigsaw":
            return evaluate.run(cfg, teacher.path(TEACHER), name=ROWS[key])
        return _transfer_and_evaluate(cfg, _cluster(cfg, embed.run(small, teacher)), ROWS[key])
    if key == "cc_deep":
        return _transfer_and_evaluate(cfg, _cluster(cfg, embed.run(cfg, pretext.run(cfg))), ROWS[key])
    if key == "cc_hog":
        return _transfer_and_evaluate(cfg, _cluster(cfg, hog.run(cfg)), ROWS[key])
    if key == "supervised":
        # NMI of the real labels against themselves is 1 by definition: not worth a column entry.
        return _transfer_and_evaluate(cfg, real_labels.run(cfg), ROWS[key], nmi=False)
    raise ValueError(f"unknown compare row {key!r}; rows: {', '.join(ROWS)}")


def table_spec(cfg: Config, evaluated: dict[str, StageDir]) -> StageSpec:
    """The table of the rows ``evaluated`` (row key -> evaluate stage), in a ``compare-<hash>`` folder."""
    return StageSpec("compare", cfg, {"rows": list(evaluated)}, list(evaluated.values()), write_table,
                     args=(evaluated,), needs_ray=False)


def seeded_key(key: str, offset: int) -> str:
    """The table key of row ``key`` trained with seed offset ``offset`` (``cc_jigsaw@1``); 0: ``key``."""
    return f"{key}@{offset}" if offset else key


def split_key(table_key: str) -> tuple[str, int]:
    """``(row key, seed offset)`` of a :func:`seeded_key`."""
    key, _, offset = table_key.partition("@")
    return key, int(offset or 0)


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    """A Markdown table; empty when there is no body row."""
    if not body:
        return ""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def seeds_table(rows: dict[str, dict[str, Any]], taps: tuple[str, ...]) -> str:
    """Mean +- standard deviation over the seeds of each row trained more than once, and the seeds' figures."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, r in rows.items():
        groups.setdefault(split_key(key)[0], []).append(r)
    body = []
    for group in (g for g in groups.values() if len(g) > 1):
        cells = [group[0]["name"], str(len(group))]
        for col in [*taps, "knn"]:
            v = 100 * np.asarray([r[col] for r in group], dtype=float)
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1):.1f} ({', '.join(f'{x:.1f}' for x in v)})")
        body.append(cells)
    return markdown_table(["method", "seeds", *taps, "kNN"], body)


# The paper's claims as (row, row it should beat): scored image by image on the same val images.
CLAIMS = (("cc_jigsaw", "jigsaw"), ("jigsaw", "random"), ("cc_deep", "cc_jigsaw"), ("cc_deep", "jigsaw"),
          ("cc_jigsaw", "cc_hog"), ("supervised", "cc_deep"))


def claims_table(cfg: Config, evaluated: dict[str, StageDir], taps: tuple[str, ...]) -> str:
    """Differences in top-1 (points) of each claim whose two rows were run, with 95% paired-bootstrap
    intervals over the val images; the rows' first seeds, from their ``predictions.npz``."""
    preds = {}
    for key in {k for pair in CLAIMS for k in pair} & set(evaluated):
        uri = evaluated[key].path(PREDICTIONS)
        try:
            with np.load(io.BytesIO(read_bytes(uri))) as z:
                preds[key] = {name: z[name] for name in z.files}
        except FileNotFoundError:  # evaluated before predictions were kept
            continue
    body = []
    for a, b in ((a, b) for a, b in CLAIMS if a in preds and b in preds):
        if not np.array_equal(preds[a]["image_id"], preds[b]["image_id"]):
            raise ValueError(f"{a} and {b} were scored on different val images")
        cells = [f"{ROWS[a]} − {ROWS[b]}"]
        for col in [*taps, "knn"]:
            d, lo, hi = paired_interval(preds[a][col], preds[b][col], seed=cfg.seed)
            cells.append(f"{100 * d:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})")
        body.append(cells)
    return markdown_table(["claim", *taps, "kNN"], body)


def write_table(cfg: Config, sd: StageDir, evaluated: dict[str, StageDir]) -> Output:
    """``compare.md``, ``compare.csv`` and ``compare.png`` from the rows' ``results.json``.

    The main table holds each row's first seed with 95% bootstrap intervals over the val images;
    rows trained on more seeds (:func:`seeded_key`) get a second table of mean and spread, and
    every seed is a line of the CSV (its ``seed`` column is the offset).
    """
    taps = tuple(cfg.evaluate.taps)
    results = {k: json.loads(read_bytes(e.path(f"{RESULTS}.json"))) for k, e in evaluated.items()}
    rows = {k: {**evaluate.result_row(r, taps), "seed": split_key(k)[1]} for k, r in results.items()}
    first = [r for r in rows.values() if r["seed"] == 0]
    table = evaluate.format_markdown(first, taps)
    chance = next(iter(results.values()))["chance"]
    note = (f"\nTop-1 (%) on the `{cfg.data.val_split}` split of `{evaluate.eval_data_path(cfg)}`; chance "
            f"{100 * chance:.1f}%. In brackets after a top-1: its 95% bootstrap interval over the val images "
            f"(1,000 resamples; it says how much the figure depends on which images were scored, not on "
            f"training). kNN: cosine, k={cfg.evaluate.knn_k}, on the best tap (in square brackets). Few-shot: "
            f"{cfg.evaluate.fewshot_ways}-way {cfg.evaluate.fewshot_shots}-shot prototypes, "
            f"{cfg.evaluate.fewshot_episodes} episodes, mean ± 95% interval over episodes. NMI: pseudo-labels "
            f"vs real labels.\n")
    seeds = seeds_table(rows, taps)
    if seeds:
        note += ("\nTraining seeds (pretext, clustering and transfer reseeded; seed offsets 0, 1, ...): "
                 "mean ± standard deviation over the seeds, then each seed's figure.\n\n" + seeds)
    claims = claims_table(cfg, {k: e for k, e in evaluated.items() if split_key(k)[1] == 0}, taps)
    if claims:
        note += ("\nThe paper's claims, image by image: top-1 of the first row minus the second (points) on the "
                 "same val images, with its 95% paired-bootstrap interval; an interval that excludes 0 is a "
                 "difference the val set resolves (the seeds above say whether training noise is smaller).\n\n"
                 + claims)
    write_bytes_atomic(sd.path(f"{TABLE}.md"), (table + note).encode())
    write_bytes_atomic(sd.path(f"{TABLE}.csv"), evaluate.format_csv(list(rows.values())).encode())
    bar_chart(first, [*taps, "knn", "fewshot"], sd.path(f"{TABLE}.png"))
    summary = {f"{k.replace('@', '_seed')}_{t}": float(r[t]) for k, r in rows.items() for t in taps}
    return Output([f"{TABLE}.md", f"{TABLE}.csv", f"{TABLE}.png"], summary)


def run(cfg: Config) -> StageDir:
    """Every row of ``evaluate.compare_rows``, then the extra seeds of ``evaluate.seed_rows``; the
    table in a ``compare-<hash>`` folder."""
    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one
    e = cfg.evaluate
    evaluated = {}
    for key in e.compare_rows:
        print(f"compare: row {ROWS[key]}", flush=True)
        evaluated[key] = row(cfg, key)
    for offset in range(1, e.compare_seeds):
        for key in (k for k in e.compare_rows if k in e.seed_rows):
            print(f"compare: row {ROWS[key]}, seed +{offset}", flush=True)
            evaluated[seeded_key(key, offset)] = row(reseeded(cfg, offset), key)
    sd = ensure(table_spec(cfg, evaluated))
    print(read_bytes(sd.path(f"{TABLE}.md")).decode(), flush=True)
    print(f"compare: {sd.uri}", flush=True)
    return sd
