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
import math
import time
from typing import TYPE_CHECKING, Any

from ktray.rundir import StageDir

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
    from ktray.config import replace

    return replace(cfg, [f"pretext.arch={cfg.transfer.arch}", f"pretext.width={cfg.transfer.width}"])


def supervised_labels(cfg: Config) -> StageDir:
    """A labels table whose "clusters" are the real classes of the train split: the Supervised row's targets."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ktray import schema
    from ktray.data import class_names, data_identity, data_path, limited_rows, load_table, long_tail_ids
    from ktray.rundir import stage_dir, write_bytes_atomic, write_manifest

    path = data_path(cfg.data)
    params = {"split": cfg.data.train_split, "limit": cfg.data.limit}
    sd = stage_dir(cfg.root, "reallabels", params, [data_identity(cfg.data)])
    if sd.done():
        return sd
    sd.make()
    t = load_table(path, cfg.data.train_split, ["image_id", "label"])
    t = limited_rows(t, cfg.data.limit)  # the rows read_images(limit=...) streams
    keep = long_tail_ids(cfg.data)
    if keep is not None:  # the long-tailed subset the other rows train on
        t = t.filter(pc.is_in(t["image_id"], value_set=keep))
    if t["label"].null_count:
        raise ValueError(f"the Supervised row needs real labels: {t['label'].null_count} images of split "
                         f"{cfg.data.train_split!r} in {path} have none")
    k = len(class_names(path)) or int(pc.max(t["label"]).as_py()) + 1
    table = pa.table(
        {
            "image_id": t["image_id"],
            "cluster": t["label"].cast(pa.int32()),
            "distance": pa.array([0.0] * t.num_rows, pa.float32()),
        },
        schema=schema.with_metadata(schema.LABELS, k=k, seed=0, features="real labels"),
    )
    schema.check_labels(table)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(sd.path("labels.parquet"), buf.getvalue())
    write_manifest(sd, config=params, inputs=[data_identity(cfg.data)], files=["labels.parquet"],
                   metrics={"summary": {"k": float(k), "images": float(t.num_rows)}, "history": []})
    return sd


def _transfer_and_evaluate(cfg: Config, labels: StageDir, name: str, nmi: bool = True) -> StageDir:
    from ktray import evaluate, transfer

    student = transfer.run(cfg, labels)
    return evaluate.run(cfg, student.path(transfer.STUDENT), labels if nmi else None, name=name)


def _cluster(cfg: Config, features: StageDir) -> StageDir:
    from ktray import kmeans
    from ktray.data import data_path

    return kmeans.run(cfg, features, images=data_path(cfg.data))


def row(cfg: Config, key: str) -> StageDir:
    """Compute (or find done) the evaluate stage of one row."""
    from ktray import embed, evaluate, hog, pretext
    from ktray.config import replace

    # Each row names its own methods: a config that says isd or distill does not change the others.
    jig = replace(cfg, ["pretext.method=jigsaw", "transfer.method=cluster"])
    isd = replace(jig, ["pretext.method=isd"])
    t = cfg.transfer
    if key == "isd":
        small = student_teacher(isd)
        return evaluate.run(cfg, pretext.run(small).path(pretext.TEACHER), name=ROWS[key])
    if key == "cc_isd":
        return _transfer_and_evaluate(isd, _cluster(isd, embed.run(isd, pretext.run(isd))), ROWS[key])
    if key == "distill_deep":
        distill = replace(jig, ["transfer.method=distill"])
        features = embed.run(jig, pretext.run(jig))
        return _transfer_and_evaluate(distill, features, ROWS[key], nmi=False)
    cfg = jig
    if key == "random":
        return evaluate.run(cfg, f"{evaluate.RANDOM_PREFIX}{t.arch}:{t.width:g}", name=ROWS[key])
    if key in ("jigsaw", "cc_jigsaw"):
        small = student_teacher(cfg)
        teacher = pretext.run(small)
        if key == "jigsaw":
            return evaluate.run(cfg, teacher.path(pretext.TEACHER), name=ROWS[key])
        return _transfer_and_evaluate(cfg, _cluster(cfg, embed.run(small, teacher)), ROWS[key])
    if key == "cc_deep":
        return _transfer_and_evaluate(cfg, _cluster(cfg, embed.run(cfg, pretext.run(cfg))), ROWS[key])
    if key == "cc_hog":
        return _transfer_and_evaluate(cfg, _cluster(cfg, hog.run(cfg)), ROWS[key])
    if key == "supervised":
        # NMI of the real labels against themselves is 1 by definition: not worth a column entry.
        return _transfer_and_evaluate(cfg, supervised_labels(cfg), ROWS[key], nmi=False)
    raise ValueError(f"unknown compare row {key!r}; rows: {', '.join(ROWS)}")


def bar_chart(rows: list[dict[str, Any]], columns: list[str], uri: str) -> None:
    """Grouped bars: one group per tap (and kNN, few-shot), one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ktray.rundir import write_bytes_atomic

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) + 2), 4.2))
    width = 0.8 / max(len(rows), 1)
    xs = np.arange(len(columns))
    for i, r in enumerate(rows):
        vals = [100 * r[c] if not math.isnan(r[c]) else 0.0 for c in columns]
        ax.bar(xs - 0.4 + width * (i + 0.5), vals, width, label=r["name"])
    ax.set_xticks(xs, columns)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("linear probe per tap, kNN and 5-way 5-shot (val split)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(uri, buf.getvalue())


def run(cfg: Config) -> StageDir:
    """Every row of ``evaluate.compare_rows``; the table in a ``compare-<hash>`` folder."""
    import json

    from ktray import evaluate
    from ktray.pipeline import init_ray
    from ktray.rundir import read_bytes, stage_dir, write_bytes_atomic, write_manifest

    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one
    started = time.time()
    keys = list(cfg.evaluate.compare_rows)
    evaluated = {}
    for key in keys:
        print(f"compare: row {ROWS[key]}", flush=True)
        evaluated[key] = row(cfg, key)
    sd = stage_dir(cfg.root, "compare", {"rows": keys}, list(evaluated.values()))
    if sd.done():
        print(read_bytes(sd.path(f"{TABLE}.md")).decode())
        return sd
    sd.make()
    taps = tuple(cfg.evaluate.taps)
    results = {k: json.loads(read_bytes(e.path(f"{evaluate.RESULTS}.json"))) for k, e in evaluated.items()}
    rows = [evaluate.result_row(results[k], taps) for k in keys]
    table = evaluate.format_markdown(rows, taps)
    chance = next(iter(results.values()))["chance"]
    note = (f"\nTop-1 (%) on the `{cfg.data.val_split}` split of `{evaluate.eval_data_path(cfg)}`; chance "
            f"{100 * chance:.1f}%. kNN: cosine, k={cfg.evaluate.knn_k}, on the best tap (in brackets). Few-shot: "
            f"{cfg.evaluate.fewshot_ways}-way {cfg.evaluate.fewshot_shots}-shot prototypes, "
            f"{cfg.evaluate.fewshot_episodes} episodes, 95% interval. NMI: pseudo-labels vs real labels.\n")
    write_bytes_atomic(sd.path(f"{TABLE}.md"), (table + note).encode())
    write_bytes_atomic(sd.path(f"{TABLE}.csv"), evaluate.format_csv(rows).encode())
    bar_chart(rows, [*taps, "knn", "fewshot"], sd.path(f"{TABLE}.png"))
    summary = {f"{k}_{t}": float(r[t]) for k, r in zip(keys, rows, strict=True) for t in taps}
    write_manifest(
        sd,
        config={"rows": keys},
        inputs=list(evaluated.values()),
        files=[f"{TABLE}.md", f"{TABLE}.csv", f"{TABLE}.png"],
        metrics={"summary": summary, "history": []},
        started=started,
    )
    print(table + note, flush=True)
    print(f"compare: {sd.uri}", flush=True)
    return sd
