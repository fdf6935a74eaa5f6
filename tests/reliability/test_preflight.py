"""Pre-flight: what can be checked before the first stage is checked before it (issue 19, item 14).

Faults and what must happen:
- a held-out split not named ``val`` (a set with ``train`` and ``test`` folders): ``ktray run`` exits 2 at
  once naming ``data.val_split`` and the splits there are, before torch or Ray is imported, no folder made;
- the same for the train split, ``embed.split``, the evaluation set (``evaluate.data``), a data path
  without shards;
- ``cluster.k`` (every ``sweep.k``) above the rows k-means would see, after ``data.limit`` and
  ``data.long_tail``: refused naming the field, the rows counted as the stages count them;
- a ``--trunk random:...`` spec that does not parse, or a width above what a config allows: refused
  naming ``--trunk``; a weights file that is not there: the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from workloads import jpeg_bytes

from ktray.config import CompareRow, ConfigError, load_config
from ktray.data.pack import pack
from ktray.data.shards import train_ids
from ktray.preflight import _ROW_STAGES, compare_stages, pipeline_stages, preflight, stream_rows

PER_CLASS = {"train": 6, "test": 2}  # 2 classes: 12 train rows, 4 test rows


@pytest.fixture(scope="module")
def train_test(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A pack of ``train/`` and ``test/`` folders (no ``val``), 16 generated JPEGs."""
    root = tmp_path_factory.mktemp("train_test")
    for split, n in PER_CLASS.items():
        for c in ("cat", "dog"):
            for i in range(n):
                p = root / "src" / split / c / f"{c}{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(jpeg_bytes((20 * i, 9, 9), size=(16, 16)))
    pack(root / "src", str(root / "out"), progress=False, workers=1)
    return str(root / "out")


def _cfg(data: str, *overrides: str) -> typing.Any:
    return load_config("tiny", [f"data.path={data}", "data.val_split=test", "cluster.k=4", *overrides])


def _refused(cfg: typing.Any, stages: typing.Collection[str], **kw: typing.Any) -> str:
    with pytest.raises(ConfigError) as err:
        preflight(cfg, stages, **kw)
    return str(err.value)


def test_run_without_the_val_split_exits_before_any_stage(train_test: str, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    # The CLI in a fresh interpreter, reporting whether torch or Ray were ever imported.
    code = (
        "import sys; from ktray.cli import main; rc = main(sys.argv[1:]); "
        "print('imported:', sorted(m for m in ('ray', 'torch') if m in sys.modules)); sys.exit(rc)"
    )
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", code, "run", "tiny", f"data.path={train_test}", f"root={root}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    seconds = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"ktray: config error: data.val_split: no shards for split 'val' in {train_test} (splits: test, train)"
    ]
    assert "imported: []" in res.stdout  # refused before torch and Ray: nothing started
    assert not root.exists(), "a refused run must leave no run root nor stage folder"
    assert seconds < 10, f"the refusal took {seconds:.1f} s"  # ~0.4 s on an idle machine: interpreter start


def test_every_split_a_command_reads_must_be_there(train_test: str, tmp_path: Path) -> None:
    cfg = _cfg(train_test)
    for stages in (pipeline_stages(cfg), compare_stages(cfg), pipeline_stages(cfg, "evaluate", "random:alexnet")):
        preflight(cfg, stages)  # train and test are there
    assert _refused(_cfg(train_test, "data.train_split=tr"), ["pretext"]).startswith(
        "data.train_split: no shards for split 'tr'"
    )
    assert _refused(_cfg(train_test, "embed.split=unlabeled"), pipeline_stages(cfg, "embed")).startswith(
        "embed.split: no shards for split 'unlabeled'"
    )
    preflight(_cfg(train_test, "embed.split=all"), pipeline_stages(cfg))
    # the evaluation set is another pack: its splits are checked, the field named
    other = _cfg(train_test, "data.val_split=val", "evaluate.data=" + train_test)
    assert "(evaluate.data; splits: test, train)" in _refused(other, ["evaluate"], trunk="random:alexnet")
    assert _refused(_cfg(str(tmp_path / "nothing")), ["pretext"]).startswith("data.path: no shards in")
    # a stage that reads no data of a kind is not held to it: evaluate with a trunk reads no train stages
    assert pipeline_stages(cfg, "evaluate", "random:alexnet") == ("evaluate",)


def test_k_above_the_rows_is_refused(train_test: str) -> None:
    cfg = _cfg(train_test, "cluster.k=13")
    assert _refused(cfg, pipeline_stages(cfg)) == (
        f"cluster.k: 13 clusters need at least as many training rows; {train_test} gives 12 (split 'train')"
    )
    preflight(_cfg(train_test, "cluster.k=12"), pipeline_stages(cfg))
    assert "gives 5 (split 'train', data.limit=5)" in _refused(
        _cfg(train_test, "cluster.k=6", "data.limit=5"), pipeline_stages(cfg, "cluster")
    )
    assert "gives 16 (every split)" in _refused(
        _cfg(train_test, "cluster.k=17", "embed.split=all"), pipeline_stages(cfg)
    )
    # the long-tailed subset, counted as the stages count it (the same helper)
    lt = _cfg(train_test, "data.long_tail=3")
    rows = stream_rows(lt, "train")
    assert rows == len(train_ids(lt.data)) == 8  # 6 of the head class, 6 / 3 of the tail
    assert "data.long_tail=3" in _refused(_cfg(train_test, "data.long_tail=3", "cluster.k=9"), pipeline_stages(lt))
    # every k of a sweep; a distill transfer never clusters; compare's CC+HOG clusters the train split
    assert _refused(_cfg(train_test, "sweep.k=[4, 40]"), pipeline_stages(cfg), sweep=True).startswith("sweep.k: 40")
    distill = _cfg(train_test, "cluster.k=40", "transfer.method=distill")
    preflight(distill, pipeline_stages(distill))
    hog = _cfg(train_test, "cluster.k=13", "embed.split=all", "evaluate.compare_rows=[cc_hog]")
    assert "gives 12 (split 'train')" in _refused(hog, compare_stages(hog))
    sup = _cfg(train_test, "data.limit=1", "evaluate.compare_rows=[supervised]")
    assert _refused(sup, compare_stages(sup)).startswith("data.limit: the Supervised row labels 1 images with 2")


@pytest.mark.parametrize(
    "spec",
    [
        "random:",
        "random:foo",
        "random:alexnet:abc",
        "random:alexnet:0",
        "random:alexnet:-1",
        "random:alexnet:nan",
        "random:alexnet:inf",
        "random:alexnet:1e9",
        "random:alexnet:4.01",
        "random:alexnet:1:2",
        "random::0.5",
        "random:ALEXNET",
        "torchvision:",
        "torchvision:../x",
        "no/such/teacher.pt",
    ],
)
def test_a_bad_trunk_is_refused_naming_it(spec: str, train_test: str) -> None:
    cfg = _cfg(train_test)
    message = _refused(cfg, pipeline_stages(cfg, "evaluate", spec), trunk=spec)
    assert message.startswith(f"--trunk {spec!r}: ") and "\n" not in message


def test_good_trunks_and_the_sample_pass(train_test: str) -> None:
    cfg = _cfg(train_test)
    for spec in ("random:alexnet", "random:resnet18:0.25", "random:vgg16:4", "torchvision:resnet18"):
        preflight(cfg, ["evaluate"], trunk=spec)
    tiny = load_config("tiny")  # the bundled sample: every command's checks pass
    for stages in (pipeline_stages(tiny), compare_stages(tiny)):
        preflight(tiny, stages)
    preflight(tiny, pipeline_stages(tiny), sweep=True)


def test_compare_knows_the_stages_of_every_row() -> None:
    assert set(_ROW_STAGES) == set(typing.get_args(CompareRow))
