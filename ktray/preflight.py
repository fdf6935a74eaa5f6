"""Pre-flight: every check the config and the data allow, before the first stage runs.

A stage checks its own inputs, but only when it starts: a held-out split that is not there
would be found by evaluate after pretext, embed, cluster and transfer have run. What can be
known without computing anything is checked here, at once, for the stages a command will run:

- the data is a complete pack (its plan) holding the train split, and the split embed reads;
- the evaluation data (``evaluate.data``, else the pipeline's) holds the train and val splits;
- ``cluster.k`` (every ``sweep.k`` in a sweep) is not above the rows k-means will see, counted
  by the subset rules the stages use (``data.limit``, ``data.long_tail``) from the shard footers
  or, for a long-tailed subset, the id and label columns;
- the Supervised row's real labels have a row per class (a labels table's k is at most its rows);
- a ``--trunk`` spec parses (``random:<arch>[:<width>]``), a weights file exists.

Each failure is a ConfigError naming the field (``data.val_split: no shards for split 'val' in
...``), so the CLI exits 2 with one line. Reads footers and small columns only; imports neither
torch nor Ray.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ktray.config import RANDOM_TRUNK, STAGES, TORCHVISION_TRUNK, Config, ConfigError, parse_random_trunk
from ktray.data.shards import (
    check_complete,
    class_names,
    data_path,
    load_table,
    long_tail_ids,
    long_tail_on,
    shard_files,
    split_names,
)
from ktray.data.subsets import limited_rows
from ktray.rundir import filesystem

# The stages that read the pipeline's train split (hog and reallabels are compare's extra stages).
_TRAINS = {"pretext", "embed", "cluster", "transfer", "hog", "reallabels"}
# compare's rows -> the stages each runs (besides evaluate).
_ROW_STAGES: dict[str, tuple[str, ...]] = {
    "random": (),
    "jigsaw": ("pretext",),
    "isd": ("pretext",),
    "cc_jigsaw": ("pretext", "embed", "cluster", "transfer"),
    "cc_deep": ("pretext", "embed", "cluster", "transfer"),
    "cc_isd": ("pretext", "embed", "cluster", "transfer"),
    "cc_hog": ("hog", "cluster", "transfer"),
    "supervised": ("reallabels", "transfer"),
    "distill_deep": ("pretext", "embed", "transfer"),
}


def pipeline_stages(cfg: Config, until: str = "evaluate", trunk: str | None = None) -> tuple[str, ...]:
    """The stages ``pipeline.run_stages(cfg, until, trunk=trunk)`` runs: every stage up to ``until``,
    without cluster when the transfer method learns from the embeddings (distill); only evaluate
    when a trunk is given for it."""
    if trunk is not None and until == "evaluate":
        return ("evaluate",)
    chain = STAGES[: STAGES.index(until) + 1]
    if until != "cluster" and cfg.transfer.method != "cluster":
        chain = tuple(s for s in chain if s != "cluster")
    return chain


def compare_stages(cfg: Config) -> tuple[str, ...]:
    """The stages ``ktray compare`` runs for ``evaluate.compare_rows``."""
    wanted = {s for row in cfg.evaluate.compare_rows for s in _ROW_STAGES[row]} | {"evaluate"}
    return tuple(s for s in (*STAGES, "hog", "reallabels") if s in wanted)


def _require_split(path: str, split: str, field: str, where: str = "") -> None:
    if not shard_files(path, split):
        names = ", ".join(split_names(path)) or "none"
        raise ConfigError(f"{field}: no shards for split {split!r} in {path} ({where}splits: {names})")


def _require_data(path: str, field: str) -> None:
    if not shard_files(path):
        raise ConfigError(f"{field}: no shards in {path} (expected files like train-00000.parquet)")
    check_complete(path)  # an interrupted pack: DataError naming what to rerun


def footer_rows(path: str, split: str | None) -> int:
    """Rows of the shards of ``split`` (every split when None), from the Parquet footers."""
    fs, _ = filesystem(path)
    return sum(pq.ParquetFile(filesystem(f)[1], filesystem=fs).metadata.num_rows for f in shard_files(path, split))


def stream_rows(cfg: Config, split: str | None) -> int:
    """Rows ``data.shards.read_split(cfg.data, split)`` streams: ``data.limit`` rows of ``split`` (every
    split when None), the train split cut to its long-tailed subset when ``data.long_tail`` asks for one."""
    d = cfg.data
    path = data_path(d)
    if not long_tail_on(d) or split not in (None, d.train_split):
        n = footer_rows(path, split)
        return min(n, d.limit) if d.limit else n
    keep = long_tail_ids(d)
    assert keep is not None
    if split == d.train_split:
        return len(keep)
    t = limited_rows(load_table(path, None, ["image_id", "label", "split"]), d.limit)
    kept = pc.or_(pc.not_equal(t["split"], d.train_split), pc.is_in(t["image_id"], value_set=keep))
    return int(pc.sum(pc.cast(kept, "int64")).as_py() or 0)


def _embed_split(cfg: Config) -> str | None:
    split = cfg.embed.split or cfg.data.train_split
    return None if split == "all" else split


def _rows_rule(cfg: Config, split: str | None) -> str:
    d = cfg.data
    rule = [f"split {split!r}" if split else "every split"]
    if d.limit:
        rule.append(f"data.limit={d.limit}")
    if long_tail_on(d):
        rule.append(f"data.long_tail={d.long_tail:g}")
    return ", ".join(rule)


def _check_k(cfg: Config, stages: Collection[str], ks: Iterable[int], field: str) -> None:
    """k-means needs at least k rows: the rows of the features it clusters (embed's split, or the
    train split for HOG features)."""
    k = max(ks, default=0)
    sources = []
    if "embed" in stages or "hog" not in stages:
        sources.append(_embed_split(cfg))
    if "hog" in stages:
        sources.append(cfg.data.train_split)
    for split in dict.fromkeys(sources):
        rows = stream_rows(cfg, split)
        if rows < k:
            raise ConfigError(
                f"{field}: {k} clusters need at least as many training rows; {data_path(cfg.data)} "
                f"gives {rows} ({_rows_rule(cfg, split)})"
            )


def _check_trunk(trunk: str, cfg: Config) -> None:
    if trunk.startswith(RANDOM_TRUNK):
        parse_random_trunk(trunk, cfg.transfer.width)
    elif trunk.startswith(TORCHVISION_TRUNK):
        name = trunk.removeprefix(TORCHVISION_TRUNK)
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
            raise ConfigError(f"--trunk {trunk!r}: expected torchvision:<model name>, e.g. torchvision:resnet18")
    else:
        fs, path = filesystem(trunk)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ConfigError(
                f"--trunk {trunk!r}: no such weights file (or random:<arch>[:<width>], torchvision:<name>)"
            )


def preflight(cfg: Config, stages: Collection[str], *, trunk: str | None = None, sweep: bool = False) -> None:
    """Raise ConfigError (DataError for an interrupted pack) when ``stages`` cannot all run on ``cfg``.

    ``stages``: what the command runs (:func:`pipeline_stages`, :func:`compare_stages`); ``trunk``:
    evaluate's ``--trunk``; ``sweep``: check every ``sweep.k`` instead of ``cluster.k``.
    """
    d = cfg.data
    path = data_path(d)
    if _TRAINS & set(stages):
        _require_data(path, "data.path")
        _require_split(path, d.train_split, "data.train_split")
        if "embed" in stages and (split := _embed_split(cfg)) not in (None, d.train_split):
            _require_split(path, split, "embed.split")
    if "evaluate" in stages:
        eval_path = cfg.evaluate.data or path
        field, where = ("evaluate.data", "evaluate.data; ") if cfg.evaluate.data else ("data.path", "")
        _require_data(eval_path, field)
        _require_split(eval_path, d.train_split, "data.train_split", where)
        _require_split(eval_path, d.val_split, "data.val_split", where)
        if trunk is not None:
            _check_trunk(trunk, cfg)
    if "cluster" in stages:
        _check_k(cfg, stages, cfg.sweep.k if sweep else (cfg.cluster.k,), "sweep.k" if sweep else "cluster.k")
    if "reallabels" in stages:
        classes = len(class_names(path))
        rows = stream_rows(cfg, d.train_split)
        if rows < classes:
            raise ConfigError(
                f"data.limit: the Supervised row labels {rows} images with {classes} classes; a labels "
                f"table needs a row per class ({_rows_rule(cfg, d.train_split)})"
            )
