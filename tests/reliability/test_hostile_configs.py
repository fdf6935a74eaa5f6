"""Configs and archives from a careless or hostile user, and properties over generated inputs.

Faults and what must happen:
- a file or folder in the working directory named like a preset: the preset is used, never shadowed;
- a YAML alias bomb (395 bytes expanding to billions of values): refused in milliseconds, in little memory;
- ``inf`` for any float field; a permutation set that cannot exist: refused before any work;
- a non-UTF-8, list or scalar YAML, bad YAML in an override: one line naming the problem, exit 2;
- any generated YAML or override (Hypothesis): a Config or a ConfigError, never another exception;
- any generated zip of odd names and bytes (Hypothesis): packed or refused with a DataError, never a
  crash; no image lost without a listed reason; no image packed twice.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from workloads import jpeg_bytes

from ktray.config import ConfigError, iter_fields, load_config
from ktray.data.pack import pack
from ktray.data.shards import DataError, load_table

REPO = Path(__file__).resolve().parents[2]
JPEG = jpeg_bytes((10, 120, 30), size=(12, 12))
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
    for i in range(8)
) + "name: *i\n"


def ktray(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ktray", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env=env)


def test_presets_are_not_shadowed_by_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # what `ktray data sample tiny` leaves behind
    (tmp_path / "imagenette").write_text("name: impostor\n")
    assert load_config("tiny").name == load_config(str(REPO / "configs" / "tiny.yaml")).name
    assert load_config("imagenette").name != "impostor"
    assert load_config("./imagenette").name == "impostor"  # a path says it is one
    with pytest.raises(ConfigError, match="is a folder"):
        load_config("./tiny")
    res = ktray("config", "tiny", cwd=tmp_path)
    assert res.returncode == 0 and "IsADirectoryError" not in res.stderr


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    assert len(BOMB) < 600
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(str(bomb))
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config("tiny", ["cluster.k=" + BOMB.replace("\n", ", ").join("{}")])
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("name", [n for n, tp, _ in iter_fields() if tp is float])
def test_inf_is_refused_for_every_float_field(name: str) -> None:
    for value in ("inf", "-inf", ".inf", "nan"):
        with pytest.raises(ConfigError, match=rf"^{name.replace('.', '[.]')}: "):
            load_config("tiny", [f"{name}={value}"])


def test_impossible_permutation_set_is_refused_at_once() -> None:
    with pytest.raises(ConfigError, match=r"pretext\.num_permutations: at most 9 "):
        load_config("tiny", ["pretext.min_hamming=9", "pretext.num_permutations=10"])
    assert load_config("tiny", ["pretext.min_hamming=9", "pretext.num_permutations=9"]).pretext.min_hamming == 9


def test_bad_config_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "scalar.yaml").write_text("hello\n")
    cases = [
        (("config", "latin1.yaml"), "not UTF-8"),
        (("config", "list.yaml"), "expected a mapping"),
        (("config", "scalar.yaml"), "expected a mapping"),
        (("config", "tiny", "cluster.k=[1, 2"), "not valid YAML"),
        (("config", "tiny", "cluster.k=inf"), "cluster.k"),
    ]
    for args, message in cases:
        res = ktray(*args, cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


# ----------------------------------------------------------------------------- properties

yaml_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
yaml_trees = st.recursive(yaml_leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)
field_names = st.sampled_from([n for n, _, _ in iter_fields()] + ["cluster", "nope.k", "cluster.k.x", ""])


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=yaml_trees, key=field_names, raw=st.text(max_size=20))
def test_config_parser_never_crashes(tree: object, key: str, raw: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    for source, overrides in ((str(path), []), ("tiny", [f"{key}={raw}"]), ("tiny", [raw])):
        with contextlib.suppress(ConfigError):  # anything else fails the test
            load_config(source, overrides)


name_parts = st.sampled_from(["train", "val", "validation", "cat", "dog", "..", ".", "", "__MACOSX", ".hid", "a b",
                              "ü", "x\\y", "\x1b[1m"])
entry_names = st.tuples(st.lists(name_parts, min_size=1, max_size=4), st.sampled_from([".jpg", ".png", ".txt", ""]))
entry_names = entry_names.map(lambda t: "/".join(t[0]) + t[1]).filter(bool)  # zipfile cannot write an empty name
payloads = st.sampled_from([JPEG, b"", b"\xff\xd8\xff", b"not an image"])


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(entry_names, payloads), min_size=1, max_size=8))
def test_archive_reader_never_crashes_nor_loses_silently(entries: list[tuple[str, bytes]], tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of the test
        for name, data in entries:
            z.writestr(name, data)
    out = tmp_path / f"out-{abs(hash(tuple(entries)))}"
    src = tmp_path / f"src-{abs(hash(tuple(entries)))}.zip"
    src.write_bytes(buf.getvalue())
    try:
        report = pack(src, str(out), progress=False, workers=1)
    except DataError:
        return  # refused as a whole, with a message: nothing half-written is read as data
    ids = load_table(str(out), columns=["image_id"])["image_id"].to_pylist()
    assert len(ids) == len(set(ids))
    # every entry is packed or listed with its reason
    assert len(ids) + len(report["skipped"]) >= len({n for n, _ in entries})
